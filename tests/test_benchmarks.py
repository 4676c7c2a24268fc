"""Smoke tests of the scripts under benchmarks/: each runs as a subprocess at its smallest
settings (the 64x2 model size, one round, one step, a single repeat) and must exit 0 and print
what it promises (both frameworks' rows, a ratio line, numbers that parse and are positive).

They check that the scripts still run against the library, not how fast anything is: the
numbers they print at these settings are not measurements. The slower ones (over ~20 s each) are
marked ``slow`` (``pytest -m slow``); the ones that need TRL skip without it
(``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NUMBER = r"[-+]?\d+(?:\.\d+)?"


@pytest.fixture(scope="module")
def bench():
    """``benchmarks/bench_vs_trl.py`` imported as a module (the scripts import it the same way)."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_vs_trl

        yield bench_vs_trl
    finally:
        sys.path.remove(str(BENCH))


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    """Run ``benchmarks/<name>`` with ``args`` from the repository root; its stdout (it must exit 0)."""
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def table_rows(out: str, arch: str, size: str) -> dict[str, list[float]]:
    """The medians table that bench_vs_trl.py prints for ``arch`` ``size``: framework → its five numbers."""
    block = out.split(f"\n{arch} {size} (", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines():
        m = re.fullmatch(rf"\s+(ours-bf16|trl-bf16|ours|trl)((?:\s+{NUMBER}){{5}})\s*", line)
        if m:
            rows[m.group(1)] = [float(x) for x in m.group(2).split()]
    return rows


def check_bench_vs_trl(out: str, results: dict, bench, archs: list[str], frameworks: list[str]) -> None:
    """What every bench_vs_trl.py smoke run must show, for each family at size 64x2, one round of one step."""
    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer

    samples = bench.PROMPTS_PER_STEP * bench.GROUP_SIZE
    assert sorted(results) == sorted(archs)
    for arch in archs:
        for fw in frameworks:  # one per-run line per framework, naming the family
            assert re.search(rf"^{arch} 64x2 round 0 seed 0 {fw}\s*:\s+{NUMBER} tok/s", out, re.M), (arch, fw, out)
        rows = table_rows(out, arch, "64x2")
        assert sorted(rows) == sorted(frameworks), out
        for fw, (tok_s, pooled, s_step, tok_step, peak_mib) in rows.items():
            assert tok_s > 0 and pooled > 0 and s_step > 0 and peak_mib > 0, (arch, fw, rows)
            assert samples <= tok_step <= samples * bench.MAX_NEW_TOKENS, (arch, fw, tok_step)  # ≥ 1 token per sample
        # a ratio line for each pair that ran: ours/TRL per precision, bf16/fp32 per framework
        for label, num, den in bench.RATIOS:
            ratio = re.search(rf"^  {arch} 64x2 {re.escape(label)}: tokens/s ×({NUMBER}) \(pooled ×({NUMBER})\), "
                              rf"s/step ×({NUMBER}), peak RSS ×({NUMBER})$", out, re.M)
            assert (ratio is not None) == (num in frameworks and den in frameworks), (label, out)
            if ratio:
                assert all(float(x) > 0 for x in ratio.groups())
        # --json: family → size → runs and medians, with the model the script built
        entry = results[arch]["64x2"]
        assert entry["arch"] == arch and entry["size"] == "64x2"
        model = bench.build_model(arch, build_char_tokenizer(VOCAB), "64x2", seed=0)
        assert entry["params"] == sum(p.numel() for p in model.parameters())
        assert sorted(entry["runs"]) == sorted(frameworks) and all(len(r) == 1 for r in entry["runs"].values())
        for fw, med in entry["medians"].items():
            assert med["tok_s"] == pytest.approx(rows[fw][0], rel=0.01, abs=1)
            assert med["tokens_step"] == pytest.approx(entry["runs"][fw][0]["tokens_step"])
        # what each run computed in: fp32 throughout, or bf16 sampling and training
        for fw, (run,) in entry["runs"].items():
            bf16 = fw.endswith("-bf16")
            assert run["rollout_dtype"] == ("bfloat16" if bf16 else "float32"), (fw, run)
            assert run["train_dtype"] == ("bfloat16" + ("-autocast" if fw == "ours-bf16" else "") if bf16 else "float32"), (fw, run)
            if fw.startswith("ours"):  # our sampler against our trainer: agreement to rounding in fp32 only
                assert run["correction"] == ("token_truncate" if bf16 else "none"), (fw, run)
                diff = run["rollout/logp_abs_diff"]
                assert (1e-5 < diff < 0.1) if bf16 else (0 <= diff < 1e-4), (fw, diff)
                if bf16:  # the correction's no-grad π_old pass
                    assert run["old_s"] > 0, run
        if "ours-bf16" in frameworks:  # the mean |Δlog p| on the bf16 run's line, as in its summary
            line = re.search(rf"^{arch} 64x2 round 0 seed 0 ours-bf16\s*:.* rollout bfloat16 train bfloat16-autocast "
                             rf"\|Δlog p\| ({NUMBER}) \(token_truncate\)", out, re.M)
            assert line, out
            assert float(line.group(1)) == pytest.approx(entry["runs"]["ours-bf16"][0]["rollout/logp_abs_diff"], abs=1e-4)


# ----------------------------------------------------------------------------- the model families

def test_build_model_families(bench):
    """--arch: each family's tiny model has the chosen size's shape, the family's own traits, and
    the character tokenizer's special ids; llama is the model every earlier run used."""
    from dapo_rl.data.synthetic import VOCAB
    from dapo_rl.models.tiny import build_char_tokenizer, build_tiny_llama

    tokenizer = build_char_tokenizer(VOCAB)
    hidden, layers, heads, inter = bench.SIZES["64x2"]
    ids = torch.tensor([tokenizer("12+3=")["input_ids"]])
    for arch in bench.ARCHS:
        model = bench.build_model(arch, tokenizer, "64x2", seed=0)
        c = model.config
        assert c.model_type == arch
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (hidden, layers, heads, inter)
        assert c.num_key_value_heads == (heads // 2 if arch in ("qwen2", "qwen3", "mistral", "gemma2") else heads)
        assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
        assert c.vocab_size == len(tokenizer)
        names = dict(model.named_parameters())
        assert ("model.layers.0.self_attn.q_proj.bias" in names) == (arch == "qwen2")
        if arch in ("mistral", "gemma2"):  # a window the benchmark's 64-token responses go past
            assert c.sliding_window == bench.SLIDING_WINDOW < bench.MAX_NEW_TOKENS
        else:
            assert getattr(c, "sliding_window", None) is None
        if arch == "gemma2":
            assert c.layer_types[:2] == ["sliding_attention", "full_attention"]
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    same = build_tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter,
                            max_positions=256, seed=0).state_dict()
    built = bench.build_model("llama", tokenizer, "64x2", seed=0).state_dict()
    assert same.keys() == built.keys() and all(torch.equal(same[k], built[k]) for k in same)
    with pytest.raises(ValueError, match="unknown arch"):
        bench.build_model("gpt2", tokenizer, "64x2", seed=0)


# ----------------------------------------------------------------------------- bench_vs_trl.py

TINY = ["--sizes", "64x2", "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1"]


def test_bench_vs_trl_ours_smoke(bench, tmp_path):
    """Our trainer in fp32 and in bf16 (bf16 sampling, bf16-autocast training), the default family:
    the per-run lines, the table rows, the bf16/fp32 ratio line, the JSON, and the bf16 run
    reporting a bf16 rollout and its |Δlog p|."""
    out = run_script("bench_vs_trl.py", *TINY, "--frameworks", "ours,ours-bf16", "--json", str(tmp_path / "r.json"))
    check_bench_vs_trl(out, json.loads((tmp_path / "r.json").read_text()), bench, ["llama"], ["ours", "ours-bf16"])


@pytest.mark.slow
def test_bench_vs_trl_ours_every_other_family(bench, tmp_path):
    """Our trainer on the families the TRL smoke test does not run (biases, q/k norms, sliding windows, fused projections)."""
    archs = ["qwen2", "qwen3", "mistral", "phi3"]
    out = run_script("bench_vs_trl.py", *TINY, "--frameworks", "ours", "--arch", ",".join(archs),
                     "--json", str(tmp_path / "r.json"))
    check_bench_vs_trl(out, json.loads((tmp_path / "r.json").read_text()), bench, archs, ["ours"])


@pytest.mark.slow
def test_bench_vs_trl_both_frameworks_two_families(bench, tmp_path):
    """Ours and TRL side by side on Llama and Gemma 2 (sliding-window layers, soft-capping): both rows and the ratio line."""
    pytest.importorskip("trl")
    archs = ["llama", "gemma2"]
    out = run_script("bench_vs_trl.py", *TINY, "--arch", ",".join(archs), "--json", str(tmp_path / "r.json"))
    check_bench_vs_trl(out, json.loads((tmp_path / "r.json").read_text()), bench, archs, ["ours", "trl"])


@pytest.mark.slow
def test_bench_vs_trl_every_precision(bench, tmp_path):
    """All four frameworks, fp32 and bf16 on both sides: four rows and all four ratio lines; TRL's
    bf16 run is seen computing in bf16 (its linear layers' outputs), its fp32 run in fp32."""
    pytest.importorskip("trl")
    frameworks = ["ours", "ours-bf16", "trl", "trl-bf16"]
    out = run_script("bench_vs_trl.py", *TINY, "--frameworks", ",".join(frameworks), "--json", str(tmp_path / "r.json"))
    check_bench_vs_trl(out, json.loads((tmp_path / "r.json").read_text()), bench, ["llama"], frameworks)


def test_bench_vs_trl_round_order(bench):
    """Round r starts at the r-th framework, modulo their number (two: they alternate)."""
    fws = ["ours", "ours-bf16", "trl", "trl-bf16"]
    assert [bench.round_order(fws, r) for r in range(5)] == [
        fws, ["ours-bf16", "trl", "trl-bf16", "ours"], ["trl", "trl-bf16", "ours", "ours-bf16"],
        ["trl-bf16", "ours", "ours-bf16", "trl"], fws]
    assert [bench.round_order(["ours", "trl"], r) for r in range(3)] == [["ours", "trl"], ["trl", "ours"], ["ours", "trl"]]
    assert bench.round_order(["ours"], 7) == ["ours"]


def test_bench_vs_trl_rejects_unknown_names():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_vs_trl.py"), "--arch", "llama,gpt2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--arch: unknown gpt2" in proc.stderr
    proc = subprocess.run([sys.executable, str(BENCH / "bench_vs_trl.py"), "--frameworks", "ours,trl-fp16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--frameworks: unknown trl-fp16" in proc.stderr
    # bf16 sampling needs an engine that has it: refused before any model is built
    proc = subprocess.run([sys.executable, str(BENCH / "bench_vs_trl.py"), "--frameworks", "ours-bf16", "--engine", "hf"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--frameworks ours-bf16 with --engine hf: rollout.dtype" in proc.stderr


# ----------------------------------------------------------------------------- trl_parity.py

@pytest.mark.slow
def test_trl_parity_smoke():
    """Same step-0 prompt ids in both frameworks, and the same gradient from the same fixed batch."""
    pytest.importorskip("trl")
    out = run_script("trl_parity.py", "--size", "64x2")
    assert re.search(r"^llama 64x2: batch of 64 completions, mean length " + NUMBER, out, re.M), out
    assert re.search(r"^step-0 prompt ids identical: True \(TRL rows repeat each prompt 8x: True\)", out, re.M), out
    grads = {name: [float(x) for x in rest] for name, *rest in re.findall(
        rf"^gradient, batch (.+?): cosine ({NUMBER}), norms ours ({NUMBER}) TRL ({NUMBER})\b", out, re.M)}
    assert sorted(grads) == ["as sampled", "pad-ended at limit fixed"], out
    for cos, ours, trl in grads.values():
        assert -1 <= cos <= 1 and ours > 0 and trl > 0
    # With the one documented difference removed, the two gradients are the same.
    cos, ours, trl = grads["pad-ended at limit fixed"]
    assert cos > 0.999 and trl == pytest.approx(ours, rel=0.01), out


# ----------------------------------------------------------------------------- matmul_peak.py

MATMUL_SHAPES = ["128² square", "64x2 train: 2048 tok × 64 → 176", "64x2 decode: 64 rows × 64 → 176"]


def matmul_rates(out: str) -> list[tuple[str, str, float, float]]:
    """(product, dtype, median, best) of each rate line matmul_peak.py printed."""
    return [(name.strip(), dtype, float(median), float(best)) for name, dtype, median, best in re.findall(
        rf"^(.+?)\s+(fp32|bf16) threads=1: median\s+({NUMBER}) GFLOP/s\s+best\s+({NUMBER})$", out, re.M)]


def test_matmul_peak_smoke():
    out = run_script("matmul_peak.py", "--square", "128", "--sizes", "64x2", "--threads", "1", "--repeats", "2",
                     "--block-s", "0.01")
    rates = matmul_rates(out)
    assert [(name, dtype) for name, dtype, _, _ in rates] == [(name, "fp32") for name in MATMUL_SHAPES], out
    for _, _, median, best in rates:
        assert 0 < median <= best


def test_matmul_peak_bf16_smoke():
    """--dtype fp32,bf16: each product's fp32 and bf16 lines side by side, both positive rates;
    --dtype bf16 alone prints only bf16 lines; an unknown dtype is refused."""
    args = ["--square", "128", "--sizes", "64x2", "--threads", "1", "--repeats", "2", "--block-s", "0.01"]
    out = run_script("matmul_peak.py", *args, "--dtype", "fp32,bf16")
    rates = matmul_rates(out)
    assert [(name, dtype) for name, dtype, _, _ in rates] == [(name, d) for name in MATMUL_SHAPES for d in ("fp32", "bf16")], out
    for _, _, median, best in rates:
        assert 0 < median <= best
    assert out.startswith(f"# torch {torch.__version__}, fp32,bf16 (native bf16: "), out
    out = run_script("matmul_peak.py", *args, "--dtype", "bf16")
    rates = matmul_rates(out)
    assert [(name, dtype) for name, dtype, _, _ in rates] == [(name, "bf16") for name in MATMUL_SHAPES], out
    assert all(median > 0 for _, _, median, _ in rates)
    proc = subprocess.run([sys.executable, str(BENCH / "matmul_peak.py"), "--dtype", "fp16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--dtype: unknown fp16" in proc.stderr


# ----------------------------------------------------------------------------- decode_products.py

def test_decode_products_smoke():
    out = run_script("decode_products.py", "--size", "64x2", "--rows", "1,4", "--threads", "1", "--repeats", "2")
    assert "# 64x2: 8 products per step" in out  # 4 products × 2 layers
    rows = re.findall(rf"^\s+(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+(onednn|mkl|mkl_packed)\s+({NUMBER})\s+({NUMBER})$",
                      out, re.M)
    assert [int(r[0]) for r in rows] == [1, 4], out
    for _, onednn, mkl, packed, fastest, gb_s, gflop_s in rows:
        ms = {"onednn": float(onednn), "mkl": float(mkl), "mkl_packed": float(packed)}
        assert all(v > 0 for v in ms.values()) and float(gb_s) > 0 and float(gflop_s) > 0
        assert ms[fastest] == min(ms.values())


# ----------------------------------------------------------------------------- profile_rollout.py

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_profile_rollout_smoke(bench, arch):
    """The fast engine alone: Llama takes the direct decode path, Mistral (sliding window) the generic one."""
    out = run_script("profile_rollout.py", "--size", "64x2", "--arch", arch, "--repeats", "1", "--threads", "1",
                     "--profile", "torch")
    m = re.search(rf"^{arch} 64x2 \(({NUMBER}) M\): (\d+) tokens in ({NUMBER}) ms \(median of 1\) = (\d+) tok/s = "
                  rf"({NUMBER}) GFLOP/s", out, re.M)
    assert m, out
    samples = bench.PROMPTS_PER_STEP * bench.GROUP_SIZE
    assert samples <= int(m.group(2)) <= samples * bench.MAX_NEW_TOKENS
    assert float(m.group(1)) > 0 and float(m.group(3)) > 0 and int(m.group(4)) > 0
    assert "Self CPU" in out  # the torch.profiler table


# ----------------------------------------------------------------------------- profile_update.py

def test_profile_update_smoke():
    """The trainer's update alone, on fixed groups, with the torch.profiler table."""
    out = run_script("profile_update.py", "--size", "64x2", "--steps", "1", "--repeats", "2", "--threads", "1",
                     "--profile", "torch")
    m = re.search(rf"^llama 64x2 \(({NUMBER}) M\): update of (\d+) response tokens in ({NUMBER}) ms \(median of 2, "
                  rf"min ({NUMBER})\) = (\d+) tok/s = ({NUMBER}) GFLOP/s", out, re.M)
    assert m, out
    assert 0 < int(m.group(2)) <= 64 * 64 and 0 < float(m.group(4)) <= float(m.group(3)) and int(m.group(5)) > 0
    assert "Self CPU" in out  # the torch.profiler table


# ----------------------------------------------------------------------------- bench_distributed.py

@pytest.mark.slow
def test_bench_distributed_smoke():
    """DDP and FSDP2 under torchrun, 2 CPU ranks (gloo): both report, and FSDP2 holds less state per rank."""
    out = run_script("bench_distributed.py", "--size", "64x2", "--nproc", "2", "--steps", "1", "--warmup", "0",
                     "--prompts", "2", "--threads", "1", timeout=400)
    found = {m[0]: m[1:] for m in re.findall(
        rf"^(ddp|fsdp2)\s+({NUMBER}) M params\s+({NUMBER}) s/step\s+params\+grads\+Adam per rank\s+({NUMBER}) MiB\s+"
        rf"peak per rank\s+({NUMBER}) MiB", out, re.M)}
    assert sorted(found) == ["ddp", "fsdp2"], out
    for params, s_step, state, peak in found.values():
        assert float(params) > 0 and float(s_step) > 0 and float(state) > 0 and float(peak) > 0
    assert found["ddp"][0] == found["fsdp2"][0]  # the same model
    assert float(found["fsdp2"][2]) < 0.75 * float(found["ddp"][2])  # sharded over 2 ranks


def test_determinism_smoke():
    # One thread: every case must give one result (the threaded race of the x[idx] control needs ≥ 2).
    out = run_script("determinism.py", "--repeats", "3", "--scale", "0.1", "--threads", "1")
    rows = re.findall(rf"^(.+?)\s+(\d+)\s+({NUMBER})$", out, flags=re.M)
    names = [name.strip() for name, _, _ in rows]
    assert "gather index_select (repeats)" in names and "fast engine decode (oneDNN + C kernels)" in names
    assert len(rows) == 11
    assert all(int(distinct) == 1 and float(ms) > 0 for _, distinct, ms in rows)


@pytest.mark.slow
def test_bench_lora_smoke(tmp_path):
    """Full and LoRA runs of 1 step on the built-in task, then the table and the ratio line."""
    out = run_script("bench_lora.py", "--steps", "1", "--set", "prompts_per_step=4", "group_size=4", "mini_batch_size=4",
                     "micro_batch_size=16", "data.eval=null", "data.builtin_train_size=128", "--lora", "model.lora.r=2",
                     "model.lora.alpha=4", "--eval-data", "builtin:chain", "--eval-args", "k=1", "greedy=false",
                     "builtin_eval_size=4", "max_response_length=16", "--out", str(tmp_path))
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in rows] == ["full", "lora"]
    full, lora = rows
    assert all(r["peak_rss_bytes"] > 0 and r["step_s"] and 0 <= r["eval_avg_at_k"] <= 1 for r in rows)
    assert 0 < lora["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 5  # adapters only
    assert re.search(rf"lora/full peak_rss_bytes={NUMBER} optimizer_state_bytes={NUMBER}", out)


def test_memory_phases_smoke():
    """A 2-step run of the built-in task: a line per phase (rest, update, rest, update, rest), then ru_maxrss."""
    out = run_script("memory_phases.py", "--set", "steps=2", "prompts_per_step=4", "group_size=4", "mini_batch_size=4",
                     "micro_batch_size=16", "data.eval=null", "data.builtin_train_size=128")
    phases = re.findall(rf"^(rest|update)((?:\s+{NUMBER}){{6}})$", out, flags=re.M)
    assert [name for name, _ in phases] == ["rest", "update", "rest", "update", "rest"]
    for _, numbers in phases:
        seconds, peak, anon, file, _, _ = map(float, numbers.split())
        assert seconds >= 0 and peak > 0 and peak + 2 >= anon + file  # RSS: anonymous + file-backed (+ shared) pages
    assert re.search(rf"ru_maxrss {NUMBER} MiB", out)


def test_lora_sampling_smoke():
    """Every way of sampling with adapters is timed, and merging in place is seen to move the base weights."""
    out = run_script("lora_sampling.py", "--prompts", "2", "--samples", "2", "--tokens", "4", "--repeats", "1")
    for way in ("fast", "fast-merged", "fast-hf-decode", "hf", "hf-merge-in-place"):
        assert re.search(rf"\n{way}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\n", out), way
    assert re.search(r"base weights changed, max \|dW\| = ", out)


def test_chain_task_properties_smoke(tmp_path):
    """A barely warmed-up long-task model: one row per digit count 2-10, groups that add up to 1."""
    out = run_script("chain_task_properties.py", "--prompts", "24", "--group", "4", "--warmup-steps", "5",
                     "--threads", "1", "--cache", str(tmp_path))
    rows = re.findall(rf"^\s+(\d+|all)\s+(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})$", out, flags=re.M)
    assert [r[0] for r in rows][-1] == "all" and all(2 <= int(r[0]) <= 10 for r in rows[:-1])
    assert int(rows[-1][1]) == 24 * 4
    assert all(0 <= float(r[2]) <= 1 and 0 <= float(r[3]) <= 1 and float(r[4]) >= 1 for r in rows)
    groups = re.search(rf"all correct ({NUMBER}), mixed ({NUMBER}), all wrong ({NUMBER})", out)
    assert groups and sum(map(float, groups.groups())) == pytest.approx(1.0, abs=2e-3)


def write_eval(folder: Path, name: str, k: int, counts: list[int], greedy: float) -> str:
    """A ``dapo eval`` result file with these per-problem correct counts out of ``k``."""
    per = [c / k for c in counts]
    payload = {"model": str(folder / name / "final"), "data": "held-out.jsonl", "num_problems": len(counts), "k": k,
               "greedy_accuracy": greedy, "avg_at_k": sum(per) / len(per), "response_length_mean": 10.0,
               "pass_at_k": {"1": sum(per) / len(per), "2": sum(c > 0 for c in counts) / len(counts)},
               "truncated_frac": 0.1, "correct_counts": counts}
    (folder / f"{name}.json").write_text(json.dumps(payload))
    return str(folder / f"{name}.json")


def write_run(folder: Path, rows: list[dict], seconds: float) -> str:
    """A run folder with these metrics rows and a summary."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "summary.json").write_text(json.dumps({"seconds": seconds}))
    return str(folder)


def test_seed_series_smoke(tmp_path):
    """Hand-made eval results on 4 problems: the paired gain and its standard error are computed by hand."""
    base = write_eval(tmp_path, "base", 2, [0, 1, 0, 1], 0.25)  # per problem 0, .5, 0, .5
    seed = write_eval(tmp_path, "seed0", 2, [2, 2, 1, 2], 0.75)  # per problem 1, 1, .5, 1: gains 1, .5, .5, .5
    run = write_run(tmp_path / "seed0", [
        {"step": 0, "eval/accuracy": 0.25}, {"step": 1, "train/response_length_mean": 12.0, "train/truncated_frac": 0.2, "time/step_s": 3.0},
        {"step": 2, "train/response_length_mean": 9.0, "train/truncated_frac": 0.0, "time/step_s": 4.0, "eval/accuracy": 0.8}], 9.0)
    figure = tmp_path / "series.png"
    out = run_script("seed_series.py", "--name", "smoke", "--base", base, "--evals", seed, "--runs", run,
                     "--figure", str(figure))
    # Gains 1, .5, .5, .5: mean 0.625, sample std 0.25, SE 0.125 -> +62.5 points ± 12.5, 5.0 SEs.
    line = next(l for l in out.splitlines() if l.startswith("seed0"))
    assert re.search(r"\+62\.5\s+12\.5\s+5\.0\s+9\s+7$", line), line
    assert "every seed above base by > 2 SE: yes" in out
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_method_study_smoke(tmp_path):
    """Two methods, two seeds each, on 4 problems: every printed statistic computed by hand."""
    def run(name, evals, entropy, step_s=2.0, mismatch=None):
        rows = [{"step": 0, "eval/accuracy": 0.2}]
        rows += [{"step": s + 1, "train/entropy": e, "train/response_length_mean": 20.0, "train/truncated_frac": 0.0,
                  "time/step_s": step_s + s} for s, e in enumerate(entropy)]
        for row, value in zip(rows[1:], mismatch or []):
            row["rollout/logp_abs_diff"] = value
        for step, accuracy in evals.items():
            rows[step]["eval/accuracy"] = accuracy
        return write_run(tmp_path / name, rows, 120.0)

    ref = [run("ref0", {2: 0.5, 4: 0.6}, [0.5, 0.4, 0.2, 0.2]), run("ref1", {2: 0.7, 4: 0.8}, [0.5, 0.4, 0.1, 0.1])]
    new = [run("new0", {2: 0.55, 4: 0.65}, [0.5, 0.5, 0.3, 0.3], 4.0, [0.1, 0.2, 0.3, 0.4]),
           run("new1", {2: 0.6, 4: 0.7}, [0.5, 0.5, 0.3, 0.3], 4.0, [0.1, 0.2, 0.3, 0.4])]
    ref_evals = [write_eval(tmp_path, "ref0", 2, [2, 2, 0, 0], 0.5), write_eval(tmp_path, "ref1", 2, [2, 0, 2, 0], 0.5)]
    new_evals = [write_eval(tmp_path, "new0", 2, [2, 2, 2, 0], 0.75), write_eval(tmp_path, "new1", 2, [2, 2, 2, 2], 1.0)]
    figure = tmp_path / "methods.png"
    out = run_script("method_study.py", "--target-step", "2", "--tail", "2", "--figure", str(figure),
                     "--method", "REF", "--runs", *ref, "--evals", *ref_evals,
                     "--method", "NEW", "--runs", *new, "--evals", *new_evals)
    # The reference's mean at step 2: (0.5 + 0.7) / 2; its last-2-step entropy (0.2 + 0.1) / 2 = 0.15.
    assert "its mean held-out accuracy at step 2: 0.600" in out
    new_part = out[out.index("NEW (2 seeds)"):]
    assert "avg@2 0.875 ± 0.177" in new_part  # 0.75 and 1.0
    assert "steps to 0.600 held-out: 4 / 2" in new_part
    assert "entropy 0.300 ± 0.000 (× 2.00 the reference's)" in new_part
    # Per seed: 75 − 50 and 100 − 50 points: mean 37.5, std 17.68, SE 12.5.
    assert "paired by seed (2): +37.5 points, SE 12.5, +3.0 SE" in new_part
    # Seed 0 per problem: 0, 0, 1, 0 (SE 0.5/2); seed 1: 0, 1, 0, 1 (SE 0.577/2).
    assert "seed 0, paired by problem: +25.0 ± 25.0 points (+1.0 SE)" in new_part
    assert "seed 1, paired by problem: +50.0 ± 28.9 points (+1.7 SE)" in new_part
    assert "wall time 2.0 min" in new_part
    # Step seconds 2, 3, 4, 5 per reference seed (median 3.5) and 4, 5, 6, 7 (median 5.5).
    assert "per step, median: s/step 3.5" in out and "per step, median: s/step 5.5 (× 1.57)" in new_part
    # |Δlog p| 0.1 … 0.4 in both seeds: mean 0.25, first 2 steps 0.15, last 2 steps 0.35; none logged by REF.
    assert "mismatch, mean over the run (first 2 → last 2 steps): |Δlog p| 0.25 (0.15 → 0.35)" in new_part
    assert "mismatch" not in out[:out.index("NEW (2 seeds)")]
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# ----------------------------------------------------------------------------- multi_turn_rollout.py

def test_multi_turn_rollout_smoke():
    """Both modes run and print their rates and the ratio (the numbers at this size mean nothing)."""
    out = run_script("multi_turn_rollout.py", "--size", "64x2", "--rounds", "1", "--threads", "1", "--budget", "24")
    single = re.search(rf"^llama 64x2 single-turn: (\d+) model tokens, ({NUMBER}) turns per trajectory, (\d+) tok/s", out, re.M)
    multi = re.search(rf"^llama 64x2 multi-turn: (\d+) model tokens, ({NUMBER}) turns per trajectory, (\d+) tok/s", out, re.M)
    assert single and multi, out
    assert float(single.group(2)) == 1.0 and float(multi.group(2)) > 1.0  # the environment kept trajectories going
    assert int(single.group(3)) > 0 and int(multi.group(3)) > 0
    assert re.search(rf"multi-turn / single-turn tokens/s: x({NUMBER})", out)
