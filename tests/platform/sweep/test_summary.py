"""The sweep summary a person reads: each pair's best config fits a terminal, the full config
stays in summary.json."""
from __future__ import annotations

import json

from msa.platform.core.run_dir import RunDir
from msa.platform.sweep.summary import CONSOLE_WIDTH, PairSummary, SweepResult

# A FINE-sized best config: about twenty searched values, as Optuna names them.
FINE_PARAMS = {"lr": 0.00031622776601683794, "batch_size": 32, "weight_decay": 1.2345678e-05, "grad_clip": 1.0,
               **{f"model_config/{name}": value for name, value in (
                   ("hidden", 128), ("dropout", 0.123456789), ("layers", 2), ("heads", 4), ("club_weight", 0.05),
                   ("recon_weight", 0.3333333333), ("orth_weight", 0.01), ("fusion", "attention"),
                   ("text_dropout", 0.2), ("audio_dropout", 0.1), ("vision_dropout", 0.1), ("temperature", 0.07),
                   ("warmup_epochs", 1), ("critic_hidden", 64), ("critic_lr", 0.001))},
               "text_encoder/lr": 3.0e-05, "text_encoder/layer_decay": 0.85}


def test_the_best_config_is_wrapped_to_the_terminal_and_kept_whole_in_summary_json(tmp_path):
    run_dir = RunDir(tmp_path)
    pairs = (PairSummary(pair="fine-mosi", model="fine", dataset="mosi", metric="valid_mae", mode="min", trials=20,
                         complete=12, pruned=7, failed=1, best_value=0.712345, best_params=FINE_PARAMS),
             PairSummary(pair="dbr-mosi", model="dbr", dataset="mosi", metric="valid_mae", mode="min", trials=3,
                         complete=0, pruned=0, failed=3))
    result = SweepResult(run_dir=run_dir, pairs=pairs)
    lines = result.table().splitlines()
    assert max(len(line) for line in lines) <= CONSOLE_WIDTH
    assert lines[1].split() == ["fine-mosi", "20", "12", "7", "1", "mae", "0.7123"]
    config_lines = [line for line in lines if line.startswith(" ")]
    assert config_lines[0].startswith("  best config: lr=0.0003162 batch_size=32 weight_decay=1.235e-05")
    shown = " ".join(config_lines)
    for name in FINE_PARAMS:
        assert f" {name.replace('/', '.')}=" in shown or f"config: {name}=" in shown, name
    assert "model_config.fusion=attention" in shown and "model_config.dropout=0.1235" in shown
    assert lines[-2].split() == ["dbr-mosi", "3", "0", "0", "3", "-"]  # no best trial: no config line
    assert lines[-1] == f"full configs: {run_dir.summary_json}"
    result.write()
    assert json.loads(run_dir.summary_json.read_text())[0]["best_params"] == FINE_PARAMS
