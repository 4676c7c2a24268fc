"""The Python API (``DAPOTrainer``, ``DAPOConfig``) and the configuration from the command line
(``dapo train --help``, ``dapo config``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dapo_rl.cli import main
from dapo_rl.config import Config, load_config
from dapo_rl.config_reference import config_keys


def _value_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            yield from _value_keys(type(value), prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_every_key_has_a_description_and_appears_in_train_help(capsys):
    rows = {row.key: row for row in config_keys()}
    assert set(_value_keys()) <= set(rows)
    assert [key for key, row in rows.items() if not row.description] == []
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in _value_keys():
        assert f"  {key}=" in text, key
    # The default and the comment of a key, both from config.py.
    assert "  clip.eps_high=0.28" in text and "Clip-Higher" in text
    assert "  dynamic_sampling.max_rounds=8" in text


def test_dapo_config_prints_yaml_that_loads_back_to_the_same_config(tmp_path, capsys):
    assert main(["config", "steps=3", "clip.eps_high=0.3", "rollout.max_response_length=12"]) == 0
    text = capsys.readouterr().out
    saved = tmp_path / "run.yaml"
    saved.write_text(text)
    assert load_config(saved) == load_config(None, ["steps=3", "clip.eps_high=0.3", "rollout.max_response_length=12"])
    assert main(["config", str(saved), "seed=4"]) == 0
    assert "seed: 4" in capsys.readouterr().out


def test_dapo_config_refuses_a_typo_in_one_line(capsys):
    assert main(["config", "clip.eps_hihg=0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'clip.eps_high'" in err


# ---------------------------------------------------------------------------------------------
# DAPOConfig: TRL's names, refusals, YAML
# ---------------------------------------------------------------------------------------------

from dapo_rl import DAPOConfig, DAPOTrainer  # noqa: E402
from dapo_rl.config import ConfigError  # noqa: E402


def test_trl_names_map_onto_our_keys():
    args = DAPOConfig(output_dir="runs/x", learning_rate=1e-5, num_generations=4, max_completion_length=12,
                      epsilon=0.2, epsilon_high=0.28, beta=0.01, loss_type="dr_grpo", scale_rewards=False,
                      mask_truncated_completions=False, num_iterations=2, temperature=0.9, top_p=0.95, save_steps=5,
                      report_to="none", dynamic_sampling={"max_rounds": 3}, overlong={"cache_length": 3})
    c = args.config
    assert (c.optim.lr, c.group_size, c.rollout.max_response_length) == (1e-5, 4, 12)
    assert (c.clip.eps_low, c.clip.eps_high, c.loss.kl_coef, c.ppo_epochs) == (0.2, 0.28, 0.01, 2)
    assert (c.loss.policy_loss, c.loss.agg_mode, c.advantage.estimator) == ("decoupled_clip", "seq-mean-token-sum-norm", "drgrpo")
    assert (c.overlong.filter, c.rollout.temperature, c.rollout.top_p, c.checkpoint.interval) == (False, 0.9, 0.95, 5)
    assert (c.dynamic_sampling.max_rounds, c.overlong.cache_length, c.logging.sinks) == (3, 3, ["jsonl"])
    assert args.learning_rate == 1e-5 and args.output_dir == "runs/x"  # read back under TRL's names
    assert DAPOConfig(epsilon=0.1).config.clip.eps_high == 0.1  # TRL: epsilon_high=None means epsilon


@pytest.mark.parametrize("trl, ours", [
    # per_device × accumulation × steps_per_generation, num_generations → prompts_per_step, mini_batch_size, micro_batch_size
    (dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=8), (1, 1, 8)),
    (dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, num_generations=8), (2, 2, 4)),
    (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=8, num_generations=4), (8, 2, 4)),
    (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, generation_batch_size=32, num_generations=4), (8, 2, 4)),
])
def test_trl_batch_arithmetic(trl, ours):
    c = DAPOConfig(**trl).config
    assert (c.prompts_per_step, c.mini_batch_size, c.micro_batch_size) == ours
    # Completions per generation and per optimiser update are TRL's.
    spg = trl.get("steps_per_generation") or trl.get("generation_batch_size", 0) // trl["per_device_train_batch_size"] or trl["gradient_accumulation_steps"]
    assert c.prompts_per_step * c.group_size == trl["per_device_train_batch_size"] * spg
    assert c.mini_batch_size * c.group_size == trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"]


def test_max_steps_counts_optimiser_updates():
    args = DAPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=8, num_generations=4, max_steps=12)
    assert args.config.steps == 3 and args.max_steps == 12  # 4 updates per step
    with pytest.raises(ConfigError, match="max_steps=10"):
        DAPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=8, num_generations=4, max_steps=10)


@pytest.mark.parametrize("options, expected", [
    (dict(learnin_rate=1e-6), "did you mean 'learning_rate'"),
    (dict(num_generation=8), "did you mean 'num_generations'"),
    (dict(use_liger_kernel=True), "'use_liger_kernel' is not an option dapo-rl supports"),
    (dict(scale_rewards="batch"), "scale_rewards='batch' is not supported"),
    (dict(loss_type="luspo"), "loss_type='luspo' is not supported"),
    (dict(vllm_mode="server"), "vllm_mode is set but use_vllm is not"),
    (dict(report_to="all"), "report_to='all' is not supported"),
    (dict(per_device_train_batch_size=3, num_generations=8), "not a multiple of num_generations=8"),
    (dict(epsilon="wide"), "clip.eps_low"),  # a bad value: our loader's message, naming our key
    (dict(clip={"eps_hihg": 0.3}), "did you mean 'clip.eps_high'"),
])
def test_unsupported_options_are_refused_in_one_line(options, expected):
    with pytest.raises(ConfigError) as info:
        DAPOConfig(**options)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_yaml_round_trip_with_dapo_train(tmp_path):
    args = DAPOConfig(output_dir=str(tmp_path / "run"), learning_rate=3e-4, num_generations=4, epsilon_high=0.3)
    path = tmp_path / "run.yaml"
    args.to_yaml(path)
    again = DAPOConfig.from_yaml(path)
    assert again.config == args.config == load_config(path)
    assert again.to_yaml() == path.read_text()
    assert DAPOConfig.from_yaml(path, seed=3).config.seed == 3


# ---------------------------------------------------------------------------------------------
# Rewards in TRL's signature
# ---------------------------------------------------------------------------------------------

from dapo_rl.rewards import RewardFunctions, score_responses  # noqa: E402


def length_reward(prompts, completions, completion_ids, **columns):
    return [float(len(ids)) for ids in completion_ids]


def only_level_one(prompts, completions, completion_ids, level, **columns):
    return [1.0 if lv == 1 else None for lv in level]


async def slow_async(prompts, completions, completion_ids, **columns):
    import asyncio

    await asyncio.sleep(0.3)
    return [0.5] * len(completions)


async def slow_async_too(prompts, completions, completion_ids, **columns):
    import asyncio

    await asyncio.sleep(0.3)
    return [-0.25] * len(completions)


def test_reward_functions_weights_none_columns_and_async():
    import time

    fns = RewardFunctions([length_reward, only_level_one, slow_async, slow_async_too], [1.0, 2.0, 1.0, 1.0])
    t0 = time.perf_counter()
    results = score_responses(fns, ["ab", "c"], ["1", "2"], [{"level": 1}, {"level": 0}], timeout_s=5,
                              prompts=["p1", "p2"], completion_ids=[[5, 6], [7]])
    assert time.perf_counter() - t0 < 0.55  # the two async functions were awaited together
    assert [r.score for r in results] == [2 + 2 * 1 + 0.5 - 0.25, 1 + 0.5 - 0.25]  # None skipped
    assert results[0].metrics == {"length_reward": 2.0, "only_level_one": 1.0, "slow_async": 0.5, "slow_async_too": -0.25}
    assert "only_level_one" not in results[1].metrics
    assert all(r.correct for r in results)


def test_a_failing_or_inapplicable_reward_function_fails_scoring_not_the_run():
    def broken(prompts, completions, completion_ids, **columns):
        raise RuntimeError("boom")

    with pytest.warns(Warning, match="boom"):
        results = score_responses(RewardFunctions([broken]), ["a"], ["1"], [{}], timeout_s=5)
    assert results[0].failed and not results[0].correct
    results = score_responses(RewardFunctions([only_level_one]), ["a"], ["1"], [{"level": 0}], timeout_s=5)
    assert results[0].failed and "returned None" in results[0].error


# ---------------------------------------------------------------------------------------------
# DAPOTrainer end to end: the shared Trainer, callbacks, and the same run through `dapo train`
# ---------------------------------------------------------------------------------------------


def chain_answer(prompts, completions, completion_ids, answer, **columns):
    """TRL style: +1 when the digit after the last '#' is the answer, else -1."""
    return [1.0 if c.rpartition("#")[2].strip()[:1] == a else -1.0 for c, a in zip(completions, answer)]


def short_bonus(prompts, completions, completion_ids, level, **columns):
    """Applies to level-1 rows only (None elsewhere)."""
    return [0.1 * (len(ids) < 6) if lv == 1 else None for ids, lv in zip(completion_ids, level)]


class Recorder:
    """A transformers TrainerCallback that records its events and logs."""

    def __init__(self):
        from transformers import TrainerCallback

        self.events, self.logs = [], []
        self.base = TrainerCallback

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def record(args, state, control, logs=None, **kwargs):
            self.events.append((name, state.global_step))
            if logs is not None:
                self.logs.append(logs)
            assert "model" in kwargs and args.output_dir
        return record


def _rows(n=24):
    from dapo_rl.data.synthetic import builtin_splits

    train, _ = builtin_splits(n, 8)
    return [{"prompt": e.prompt, "answer": e.answer, "level": i % 2} for i, e in enumerate(train)]


def _digest(folder):
    import hashlib

    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def _stable_metrics(run_dir):
    from dapo_rl.telemetry import read_metrics

    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in read_metrics(run_dir / "metrics.jsonl")]


TINY = dict(prompts_per_step=2, group_size=4, mini_batch_size=2, rollout={"max_response_length": 8},
            overlong={"cache_length": 2}, dynamic_sampling={"max_rounds": 2}, logging={"progress": False})


def test_dapo_trainer_trains_through_the_shared_trainer_and_dapo_train_repeats_it(tmp_path, quickstart_cache, monkeypatch, capsys):
    import json

    from dapo_rl.training.trainer import Trainer

    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    args = DAPOConfig(output_dir=str(tmp_path / "api"), max_steps=2, seed=0, reward_weights=[1.0, 1.0],
                      quickstart={"cache_dir": quickstart_cache}, **TINY)
    recorder = Recorder()
    trainer = DAPOTrainer(model="builtin:chain-tiny", reward_funcs=[chain_answer, short_bonus], args=args,
                          train_dataset=_rows(), callbacks=[recorder])
    result = trainer.train()
    assert isinstance(trainer.trainer, Trainer) and result.steps == 2
    names = [e for e, _ in recorder.events]
    assert names[0] == "on_train_begin" and names[-1] == "on_train_end"
    assert names.count("on_step_end") == 2 and names.count("on_log") == 2 and "on_save" in names
    assert [s for e, s in recorder.events if e == "on_step_end"] == [1, 2]  # optimiser updates (one per step here)
    assert all("reward/chain_answer" in logs and "train/accuracy" in logs for logs in recorder.logs)
    rows = [json.loads(line) for line in (tmp_path / "api" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/chain_answer" in r and "reward/short_bonus" in r for r in rows)

    saved = trainer.save_model(tmp_path / "saved")
    assert (saved / "config.json").is_file()

    # The run folder's config.yaml names the dataset file and the functions: `dapo train` runs it again.
    from dapo_rl.cli import main

    assert main(["train", str(tmp_path / "api" / "config.yaml"), f"output_dir={tmp_path / 'cli'}"]) == 0
    assert _stable_metrics(tmp_path / "cli") == _stable_metrics(tmp_path / "api")
    assert _digest(tmp_path / "cli" / "final") == _digest(tmp_path / "api" / "final")  # the same weights, bit for bit


def test_a_reward_given_as_a_closure_is_refused_by_dapo_train_in_one_line(tmp_path, capsys):
    args = DAPOConfig(output_dir=str(tmp_path / "api"), **TINY)
    trainer = DAPOTrainer(model="builtin:chain-tiny", reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions), args=args)
    assert trainer.config.reward.functions == ["<python>:<lambda>"]
    (tmp_path / "run.yaml").write_text(__import__("dapo_rl.config", fromlist=["to_yaml"]).to_yaml(trainer.config))
    from dapo_rl.cli import main

    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reward.functions" in err


def test_a_peft_lora_config_becomes_model_lora_and_trains_only_the_adapters(tmp_path, quickstart_cache, quickstart_model, monkeypatch):
    from peft import LoraConfig
    from safetensors.torch import load_file

    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    args = DAPOConfig(output_dir=str(tmp_path / "lora"), max_steps=1, seed=0, quickstart={"cache_dir": quickstart_cache}, **TINY)
    trainer = DAPOTrainer(model="builtin:chain-tiny", reward_funcs=chain_answer, args=args, train_dataset=_rows(),
                          peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["v_proj", "q_proj"]))
    lora = trainer.config.model.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (4, 8.0, 0.0, ["q_proj", "v_proj"])
    trainer.train()
    params = dict(trainer.model.named_parameters())
    trainable = sorted(name for name, p in params.items() if p.requires_grad)
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[1] for name in trainable} == {"q_proj", "v_proj"}
    # PEFT starts B at zero: a B that moved was trained; the base weights are the warm-up's, bit for bit.
    assert any(params[name].abs().sum() > 0 for name in trainable if ".lora_B." in name)
    base = load_file(str(Path(quickstart_model) / "model.safetensors"))
    trained_base = {name.replace(".base_layer", ""): p for name, p in params.items() if not p.requires_grad}
    assert base.keys() <= trained_base.keys() | {"lm_head.weight"}
    assert all(torch.equal(trained_base[k], base[k]) for k in base if k in trained_base)
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()


def test_a_lora_option_dapo_rl_does_not_build_is_refused_in_one_line(tmp_path):
    from peft import LoraConfig

    args = DAPOConfig(output_dir=str(tmp_path / "lora"), **TINY)
    for options, name in ((dict(use_dora=True), "use_dora"), (dict(bias="all"), "bias"), (dict(modules_to_save=["lm_head"]), "modules_to_save")):
        with pytest.raises(ConfigError) as info:
            DAPOTrainer(model="builtin:chain-tiny", reward_funcs=chain_answer, args=args,
                        peft_config=LoraConfig(r=4, target_modules="all-linear", **options))
        assert f"peft_config.{name}" in str(info.value) and "\n" not in str(info.value)


def test_a_model_object_and_its_processing_class_train_as_its_folder_would(tmp_path, quickstart_cache, quickstart_model, monkeypatch):
    """A loaded PreTrainedModel (and tokenizer) is trained in place, and ends in the weights its
    folder given as a path ends in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(quickstart_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(quickstart_model)
    runs = {}
    for name, given in (("object", model), ("path", quickstart_model)):
        args = DAPOConfig(output_dir=str(tmp_path / name), max_steps=2, seed=0, quickstart={"cache_dir": quickstart_cache}, **TINY)
        trainer = DAPOTrainer(model=given, reward_funcs=chain_answer, args=args, train_dataset=_rows(),
                              processing_class=tokenizer if name == "object" else None)
        assert trainer.config.model.path == quickstart_model  # the YAML names the folder the object came from
        trainer.train()
        runs[name] = trainer
    assert runs["object"].model is model  # trained in place, as TRL does
    assert runs["object"].trainer.tokenizer is tokenizer
    assert _digest(tmp_path / "object" / "final") == _digest(tmp_path / "path" / "final")
    assert _digest(tmp_path / "object" / "final") != _digest(Path(quickstart_model))


class StopAfter:
    """A TrainerCallback that asks to stop once ``global_step`` reaches ``step``."""

    def __init__(self, step):
        from transformers import TrainerCallback

        self.step, self.seen, self.saves = step, [], []
        assert TrainerCallback  # the events below are TrainerCallback's

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)
        if state.global_step == self.step:
            control.should_training_stop = True

    def on_save(self, args, state, control, checkpoint=None, **kwargs):
        self.saves.append((state.global_step, checkpoint))


def test_a_callback_stop_checkpoints_and_resume_from_checkpoint_continues_exactly(tmp_path, quickstart_cache, monkeypatch, capsys):
    """Three steps straight, or a callback's stop after step 1 and train(resume_from_checkpoint=...)
    on the same trainer: the same metrics and the same final weights (sha256)."""
    from dapo_rl.training.checkpoint import latest_checkpoint

    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))

    def trainer(name, callbacks=()):
        args = DAPOConfig(output_dir=str(tmp_path / name), max_steps=3, seed=0, quickstart={"cache_dir": quickstart_cache}, **TINY)
        return DAPOTrainer(model="builtin:chain-tiny", reward_funcs=[chain_answer, short_bonus], args=args,
                           train_dataset=_rows(), callbacks=list(callbacks))

    assert trainer("straight").train().steps == 3
    stopper = StopAfter(1)
    split = trainer("split", [stopper])
    result = split.train()
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert result.steps == 1 and stopper.seen == [1] and checkpoint is not None and checkpoint.name == "step_000001"
    assert stopper.saves == [(1, checkpoint)] and not (tmp_path / "split" / "final").exists()
    assert "stopped by a callback after step 1 of 3" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not the latest checkpoint"):
        split.train(resume_from_checkpoint=tmp_path / "split" / "checkpoints" / "step_000007")
    # The same trainer resumes: its callback's earlier stop does not stop the continued run.
    assert split.train(resume_from_checkpoint=checkpoint).steps == 3
    assert stopper.seen == [1, 2, 3] and split.state.global_step == 3
    assert _digest(tmp_path / "split" / "final") == _digest(tmp_path / "straight" / "final")
    assert _stable_metrics(tmp_path / "split") == _stable_metrics(tmp_path / "straight")


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["model-folder-tokenizer", "processing_class"])
def test_a_conversational_prompt_column_in_a_dataset_goes_through_the_chat_template(with_tokenizer, tmp_path, quickstart_cache,
                                                                                    quickstart_model, monkeypatch):
    """A datasets.Dataset whose prompts are chat messages: the chat template (data.chat_template,
    given to the folder's tokenizer or to processing_class) renders them, and the reward functions
    get the messages as given, with the other columns."""
    import datasets
    from transformers import AutoTokenizer

    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    template = tmp_path / "plain.jinja"  # the built-in model has no chat template: this one renders its plain prompt
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"], "level": r["level"]} for r in _rows()]
    seen = []

    def record(prompts, completions, completion_ids, level, **columns):
        seen.extend(zip(prompts, level))
        return chain_answer(prompts, completions, completion_ids, **columns)

    args = DAPOConfig(output_dir=str(tmp_path / "chat"), max_steps=1, seed=0, quickstart={"cache_dir": quickstart_cache},
                      data={"chat_template": str(template)}, **TINY)
    trainer = DAPOTrainer(model="builtin:chain-tiny", reward_funcs=record, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(quickstart_model) if with_tokenizer else None)
    assert trainer.config.data.use_chat_template is True
    assert trainer.train().steps == 1
    by_prompt = {r["prompt"][0]["content"]: r["level"] for r in rows}
    assert seen and all(isinstance(p, list) and p[0]["role"] == "user" for p, _ in seen)
    assert all(by_prompt[p[0]["content"]] == level for p, level in seen)  # columns stay with their row
    assert "{{ m['content'] }}" in (tmp_path / "chat" / "final" / "tokenizer_config.json").read_text() + \
        "".join(f.read_text() for f in (tmp_path / "chat" / "final").glob("*.jinja"))


def test_tools_and_an_environment_factory_map_to_the_rollout_keys():
    from dapo_rl.tools.calculator import calculator

    trainer = DAPOTrainer(model="builtin:calculator-tiny", tools=[calculator], args=DAPOConfig(output_dir="unused"))
    assert trainer.config.rollout.tools == ["dapo_rl.tools.calculator:calculator"]

    class Local:  # not importable by module:name, so config.yaml could not name it
        def reset(self, row):
            return None

        def step(self, text):
            return None, True

    with pytest.raises(ConfigError, match=r"^environment_factory: .*Local.* does not import back by module:name"):
        DAPOTrainer(model="builtin:chain-tiny", environment_factory=Local, args=DAPOConfig(output_dir="unused"))
    with pytest.raises(ConfigError, match=r"^tools: .* does not import back by module:name"):
        DAPOTrainer(model="builtin:chain-tiny", tools=[lambda x: x], args=DAPOConfig(output_dir="unused"))


def test_dapo_config_saved_and_passed_back_to_dapo_train_reproduces_the_run(tmp_path, quickstart_cache, monkeypatch, capsys):
    monkeypatch.setenv("DAPO_RL_CACHE", str(tmp_path / "cache"))
    overrides = ["steps=2", "prompts_per_step=2", "group_size=4", "mini_batch_size=2", "rollout.max_response_length=8",
                 "overlong.cache_length=2", "dynamic_sampling.max_rounds=2", "logging.progress=false", "eval.interval=0",
                 f"quickstart.cache_dir={quickstart_cache}"]
    assert main(["config", *overrides]) == 0
    saved = tmp_path / "run.yaml"
    saved.write_text(capsys.readouterr().out)
    assert main(["train", *overrides, f"output_dir={tmp_path / 'direct'}"]) == 0
    assert main(["train", str(saved), f"output_dir={tmp_path / 'from-file'}"]) == 0
    assert _stable_metrics(tmp_path / "from-file") == _stable_metrics(tmp_path / "direct")
    assert _digest(tmp_path / "from-file" / "final") == _digest(tmp_path / "direct" / "final")
