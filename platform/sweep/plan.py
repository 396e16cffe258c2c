"""What ``msa sweep --dry-run`` and ``msa run --dry-run`` print: the plan of a sweep whose every
input was checked (`SweepSession`'s constructor), without starting Ray or writing anything.

It names each dataset and pair, each study and its budget, the earlier studies a warm start
reads, the trial's shape, every text-cache entry the trials read (reused or to compute, with its
size on disk) and the driver's expected
peak memory: the loaded datasets, the token ids it makes while tokenizing, the encoder's weights
when a prefix is to be computed in the driver (a GPU node's Ray task computes it otherwise), and
the Python, torch, Ray and MLflow runtime the driver imports (`DRIVER_RUNTIME_BYTES`, measured
with `benchmarks/scale.py`). The prefixes themselves never count: they stream to disk block by
block, and trials read them from there.
"""
from __future__ import annotations

from msa.platform.core.files import human_bytes
from msa.platform.core.run_dir import RunDir
from msa.platform.data.features import FeatureSet
from msa.platform.sweep.cluster import trial_shape
from msa.platform.sweep.config import SweepConfig
from msa.platform.sweep.pairs import Pair
from msa.platform.sweep.text_inputs import TextPlan
from msa.platform.sweep.warm_start import EarlierStudy

DRIVER_RUNTIME_BYTES = 700 * 2**20


def loaded_bytes(dataset: FeatureSet) -> int:
    """The bytes of a dataset's arrays in memory."""
    total = 0
    for split in dataset.splits.values():
        arrays = [split.ids, split.labels, *split.features.values(), *split.lengths.values(),
                  *split.unimodal_labels.values(), split.raw_text, split.text_bert]
        total += sum(a.nbytes for a in arrays if a is not None)
    return total


def describe_plan(config: SweepConfig, datasets: dict[str, FeatureSet], pairs: dict[str, Pair],
                  text_plan: TextPlan | None, run_dir: RunDir | None, earlier: list[EarlierStudy]) -> str:
    """The plan, as printed (see the module docstring)."""
    budget, search, resources = config.budget, config.search, config.resources
    where = str(run_dir.root) if run_dir is not None else f"{config.storage}/{config.name}-<UTC time>/"
    lines = ["dry run: every input checked; nothing written, Ray not started", f"run directory  {where}", "datasets"]
    named = max(len(name) for name in datasets)
    for name, dataset in datasets.items():
        clips = sum(len(split) for split in dataset.splits.values())
        lines.append(f"  {name:<{named}}  {dataset.source or 'generated into the run directory'}  sha256 {dataset.fingerprint[:12]}  "
                     f"{dataset.task} ({dataset.metric_suite} metrics), {clips:,} clips, {human_bytes(loaded_bytes(dataset))} in memory")
    unit = "" if search.budget_unit == "epochs" else \
        f" s, counted in training seconds up to {budget.max_trial_seconds:g} s a trial"
    scheduler = (f"asha (grace {search.grace_period}{unit}, reduction {search.reduction_factor})"
                 if search.scheduler == "asha" else "none")
    lines.append(f"pairs  ({search.sampler} sampler, seed {search.seed}; scheduler {scheduler}; at most {budget.max_epochs} "
                 f"epochs a trial, {budget.seeds_per_trial} seed(s) each"
                 + (f"; {budget.time_budget_s:g} s per pair" if budget.time_budget_s else "") + ")")
    width = max(len(pair.name) for pair in pairs.values())
    for pair in pairs.values():
        lines.append(f"  {pair.name:<{width}}  study optuna/{pair.name}.db  {budget.trials_per_pair} trials  valid {pair.metric} "
                     f"({pair.mode})")
    for study in earlier:
        lines.append(f"warm start     {study.label}: {len(study.trials)} scored trials of {study.model}"
                     + ("" if study.facts else " (no task recorded: its best configs are queued)"))
    shape = trial_shape(resources)
    per_worker = ", ".join(f"{amount:g} {name}" for name, amount in shape.per_worker.items())
    lines.append(f"trial shape    {shape.workers} worker(s) of {per_worker}"
                 f"{' (inline: in the Tune trial process)' if shape.inline else f', placement {shape.placement}'}; "
                 f"{resources.max_concurrent_trials} trial(s) at once, {resources.schedule} schedule")
    token_bytes = encoder_bytes = 0
    if text_plan is not None:
        lines.append(f"text cache     {text_plan.cache.root}  (encoder {text_plan.encoder.folder}, "
                     f"max_length {text_plan.base.max_length})")
        for dataset in datasets.values():
            for entry in text_plan.entries(dataset):
                what = "token ids" if entry.depth == 0 else f"prefix after {entry.depth} layer(s)"
                how = "reuse  " if entry.cached else "compute"
                lines.append(f"  {dataset.name:<{named}}  {what:<26} {how} {human_bytes(entry.size_bytes)}"
                             f"{'' if entry.cached else ' (estimated)'}  {entry.key.digest()[:12]}")
            clips = sum(len(split) for split in dataset.splits.values())
            token_bytes = max(token_bytes, 2 * clips * text_plan.base.max_length * 8)  # ids and mask, int64
            if not all(entry.cached for entry in text_plan.entries(dataset)[1:]):
                encoder_bytes = text_plan.encoder.weights_file().stat().st_size  # computing a prefix here
    data_bytes = sum(loaded_bytes(d) for d in datasets.values())
    peak = data_bytes + token_bytes + encoder_bytes + DRIVER_RUNTIME_BYTES
    lines.append(f"driver memory  about {human_bytes(peak)} at its peak: datasets {human_bytes(data_bytes)}"
                 + (f", tokenizing {human_bytes(token_bytes)}" if token_bytes else "")
                 + (f", the encoder computing prefixes {human_bytes(encoder_bytes)} (none on a GPU node)" if encoder_bytes else "")
                 + f", runtime {human_bytes(DRIVER_RUNTIME_BYTES)}")
    return "\n".join(lines)
