"""Experiments built on the library (the DAPO ablation ladder): they compose runs, they are not the trainer."""
