"""The sweep driver: `run_sweep`, and the `SweepSession` behind it that `msa run` keeps open for
its ensemble half. Runs in the driver process.

For each (model, dataset) pair a `ray.tune.Tuner` drives `PruningAwareOptunaSearch` (TPE or
random, seeded, persisted in SQLite inside the run directory) and ASHA over `run_trial`
(`trial.py`). Datasets are loaded and hashed once here and shared through the object store.
Everything is tracked in MLflow (`msa.platform.tracking`), and each study's best trial is
registered when the study ends. The run directory's layout is `msa.platform.core.run_dir`.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import optuna
import ray
import yaml
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from msa.platform.core.compat import ray_logs_dir, restored_run_config, searcher_study
from msa.platform.core.config import to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import RunDir
from msa.platform.data.features import FeatureSet
from msa.platform.data.text import absolute_encoder_path
from msa.platform.sweep.callbacks import (
    LostCheckpoints,
    PairPlan,
    StudyWatcher,
    SweepConsole,
    TrialRunCloser,
    study_is_done,
    tune_output,
)
from msa.platform.sweep.cluster import (
    check_address_format,
    check_shared_storage,
    check_trial_fits,
    connect,
    node_kinds,
    trial_shape,
)
from msa.platform.sweep.config import SweepConfig
from msa.platform.sweep.disk_full import DiskFullStop, SpaceReserve
from msa.platform.sweep.pairs import check_models_fit_data, load_datasets, saved_builtin, sweep_pairs
from msa.platform.sweep.plan import describe_plan
from msa.platform.sweep.schedule import MatrixSearch, PairScheduler, pair_scheduler
from msa.platform.sweep.search_space import SearchSpace, load_search_space
from msa.platform.sweep.searcher import PruningAwareOptunaSearch, trial_dirname
from msa.platform.sweep.summary import PairSummary, SweepResult, summarize_study
from msa.platform.sweep.text_inputs import DatasetInputs, driver_node_has_gpu, materialize, plan_text
from msa.platform.sweep.trial import PairContext, run_trial
from msa.platform.sweep.warm_start import TaskFacts, WarmStart, plan_warm_start, read_earlier_studies
from msa.platform.tracking.server import MlflowServer, check_tracking_uri
from msa.platform.tracking.sweep_runs import SweepTracking
from msa.platform.training.config import resolve_config


class SweepInterrupted(MsaError):
    """The user stopped the sweep; its state is saved and `msa sweep --resume` continues it."""

    exit_code = 130
    resumable = True


def run_sweep(config: SweepConfig, *, resume_dir: Path | None = None, address: str | None = None,
              verbose: int = 0) -> SweepResult:
    """Run (or resume) a sweep; its summary is also written to the run directory.

    `verbose` 1 adds Ray's trial table and the trials' own output to the console, 2 every
    trial result too.

    Raises:
        MsaError: invalid config, data or metric, or resources no node could ever give (before
            anything is written); `SweepInterrupted` (exit 130) after Ctrl-C, state saved.
    """
    with SweepSession(config, resume_dir=resume_dir, address=address, verbose=verbose) as session:
        return session.run()


class SweepSession:
    """A sweep's driver-side resources: its datasets (loaded and hashed once), its run directory,
    its tracking server (its own over the run directory, or the configured one) and, while `run`
    runs, the Ray runtime. Use as a context manager; on exit the own server is stopped, and a new
    sweep refused before any trial was queued leaves no folder behind.

    Every input is checked in the constructor, before anything is written (see `run_sweep`).
    """

    def __init__(self, config: SweepConfig, *, resume_dir: Path | None = None, address: str | None = None,
                 verbose: int = 0):
        self.config, self.address, self.verbose = config, address, verbose
        self.resuming = resume_dir is not None
        self.datasets = load_datasets(config, RunDir(resume_dir) if self.resuming else None)
        self.spaces = {model: load_search_space(model, config.search.spaces.get(model)) for model in config.models}
        # With a text encoder: the cache entries every dataset's trials can read.
        self.text_plan = plan_text(config.train, list(self.spaces.values()), self.datasets)
        self.pairs = sweep_pairs(config, self.datasets)
        check_models_fit_data(self.pairs, self.datasets, text_encoder=self.text_plan is not None)
        if config.tracking.uri:  # an unreachable server is an input error
            check_tracking_uri(config.tracking.uri)
        if address:
            check_address_format(address)
        if address and ray.is_initialized():  # joining would otherwise be skipped silently
            raise MsaError(f"cannot join the Ray cluster at {address!r}: this process already runs Ray; "
                           f"start the sweep from a fresh process")
        self.run_dir = RunDir(resume_dir) if self.resuming else None
        if self.resuming:
            _check_study_names(self.run_dir, self.pairs)
        # A resumed sweep's studies hold what they carried when they were made.
        self.earlier = [] if self.resuming else read_earlier_studies(config.search.warm_start, config.models)
        self.server: MlflowServer | None = None
        self.reserve: SpaceReserve | None = None
        self._trials_queued = False  # until then, a new sweep that is refused leaves no run directory behind

    def plan(self) -> str:
        """What the sweep would do (`--dry-run`), from the checked inputs alone."""
        return describe_plan(self.config, self.datasets, self.pairs, self.text_plan, self.run_dir, self.earlier)

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.uri or self.server.uri

    def __enter__(self) -> "SweepSession":
        storage = Path(self.config.storage).resolve()
        self._new_folders = [f for f in (storage, *storage.parents) if not f.exists()]  # deepest first
        try:
            if self.run_dir is None:
                self.run_dir = _make_run_dir(self.config)
            self.reserve = SpaceReserve(self.run_dir)
            self.reserve.hold()
            where = {given or source: source for given, source in self.config.dataset_entries()}
            self.datasets = {name: dataset if dataset.source else saved_builtin(dataset, where[name], self.run_dir)
                             for name, dataset in self.datasets.items()}
            if not self.config.tracking.uri:
                self.server = MlflowServer(self.run_dir.root)
                self.server.launch()  # it boots while Ray starts
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()
        if self.reserve is not None:
            self.reserve.release()
        if not self.resuming and not self._trials_queued and self.run_dir is not None:
            shutil.rmtree(self.run_dir.root, ignore_errors=True)
            for folder in self._new_folders:  # the storage folders this sweep created, if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def run(self) -> SweepResult:
        """Every pair's study, all scheduled together, on a private Ray runtime or the joined cluster."""
        own_runtime = not ray.is_initialized()  # tests and notebooks may already hold one
        try:
            refs = self._start_ray(own_runtime)
            if self.server is not None:
                self.server.wait_ready()
            self._trials_queued = True
            with SweepTracking(self.tracking_uri, self.run_dir, to_plain(self.config)) as tracking:
                pairs = self._run_matrix(refs, tracking)
        finally:
            if own_runtime:
                ray.shutdown()
        result = SweepResult(run_dir=self.run_dir, pairs=tuple(pairs))
        result.write()
        return result

    def _start_ray(self, own_runtime: bool) -> dict[str, DatasetInputs]:
        """Start or join Ray, refuse what the cluster cannot run, and make what the trials read
        (the text cache's entries, the datasets in the object store)."""
        resources = self.config.resources
        joined = connect(self.address, resources.max_concurrent_trials, log_to_driver=self.verbose > 0) \
            if own_runtime else None
        kinds = node_kinds(joined is not None)
        check_trial_fits(trial_shape(resources), kinds)
        if joined is not None:
            checked_from = time.monotonic()
            alive = sum(kind.name.startswith("node ") for kind in kinds)
            check_shared_storage(self.run_dir.root, self.config.tracking.uri, client=joined.startswith("ray://"),
                                 can_grow=len(kinds) > alive)
            print(f"[cluster] joined {joined}: {alive} nodes alive, {len(kinds) - alive} node types the autoscaler "
                  f"may add; every node sees {self.run_dir.root} and reaches MLflow (checked in "
                  f"{time.monotonic() - checked_from:.1f} s)", flush=True)
        elif own_runtime and not self.verbose:
            print(f"trial output: {ray_logs_dir()} (-v prints it here too)", flush=True)
        on_cluster = joined is not None
        return materialize(self.text_plan, self.datasets, ship=on_cluster,
                           remote=self.text_plan is not None and (on_cluster or driver_node_has_gpu()))

    def _run_matrix(self, inputs: dict[str, DatasetInputs], tracking: SweepTracking) -> list[PairSummary]:
        """One Tune run over every pair; each study is closed (and its best registered) as soon
        as it is done, the others still running."""
        config = self.config
        self.run_dir.optuna_dir.mkdir(exist_ok=True)
        contexts, plans, closed = {}, {}, set()
        for pair in self.pairs.values():
            study_tracking, was_closed = tracking.open_study(pair.name, pair.model, self.datasets[pair.dataset])
            if was_closed:
                closed.add(pair.name)
            contexts[pair.name] = PairContext(
                inputs=inputs[pair.dataset], run_dir=self.run_dir, pair=pair.name, shape=trial_shape(config.resources),
                max_failures=config.resources.max_failures, tune_metric=f"best_valid_{pair.metric}",
                resuming=self.resuming, tracking=study_tracking,
            )
            plans[pair.name] = PairPlan(budget=config.budget.trials_per_pair, metric=pair.metric)
            print(f"[{pair.name}] study {self.run_dir.study_url(pair.name)} ({config.budget.trials_per_pair} trials, "
                  f"metric valid {pair.metric}, {pair.mode})", flush=True)
        shape = next(iter(contexts.values())).shape
        trainable = tune.with_resources(tune.with_parameters(run_trial, contexts=contexts), shape.tune_request)
        summaries: dict[str, Future] = {}
        # The driver's closing thread: trial runs and studies are closed (and studies registered,
        # seconds each) in the order Tune ended them, while Tune's controller goes on scheduling.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="msa-close") as closer:
            trial_closes: list[Future] = []

            def close_trial(*args) -> None:
                trial_closes.append(closer.submit(*args))

            def close_when_done(pair: str) -> None:
                summaries[pair] = closer.submit(self._close_study, pair, contexts[pair], tracking)

            disk_full = DiskFullStop(self.run_dir, self.reserve, tracking.uri)
            callbacks = [SweepConsole(plans), disk_full,
                         TrialRunCloser({p: c.tracking for p, c in contexts.items()}, self.run_dir, close_trial),
                         StudyWatcher(plans, self.run_dir, close_when_done, closed),
                         *([LostCheckpoints()] if self.resuming else [])]
            experiment = self.run_dir.tune_experiment
            with tune_output(self.verbose):
                if self.resuming and tune.Tuner.can_restore(str(experiment)):
                    tuner = _restored_tuner(experiment, trainable, callbacks, self.verbose)
                else:
                    tuner = self._new_tuner(contexts, trainable, callbacks, tracking)
                tuner.fit()
        for future in trial_closes:
            future.result()  # raise what a close raised
        disk_full.raise_if_stopped(self.run_dir)
        done, unfinished = {}, []
        for pair, context in contexts.items():
            if pair in summaries:
                done[pair] = summaries[pair].result()
                continue
            study = optuna.load_study(study_name=pair, storage=self.run_dir.study_url(pair))
            if pair in closed:  # by an earlier driver
                done[pair] = self._summarize(pair, study)
            elif study_is_done(study, config.budget.trials_per_pair):
                done[pair] = self._close_study(pair, context, tracking)
            else:
                unfinished.append(pair)
        # Tune returns normally on Ctrl-C, and the trials it stops then never reach the searcher:
        # a study still short of its budget (with time left) means the user stopped the sweep.
        if unfinished:
            raise SweepInterrupted(f"sweep interrupted ({len(unfinished)} of {len(contexts)} studies unfinished: "
                                   f"{', '.join(unfinished)}); resume with: msa sweep --resume {self.run_dir.root}")
        return [done[pair] for pair in contexts]

    def _summarize(self, pair: str, study) -> PairSummary:
        facts = self.pairs[pair]
        return summarize_study(study, run_dir=self.run_dir, pair=pair, model=facts.model, dataset=facts.dataset,
                               metric=facts.metric)

    def _close_study(self, pair: str, context: PairContext, tracking: SweepTracking) -> PairSummary:
        """Log the study's outcome, register its best trial and close its run (`SweepTracking`)."""
        study = optuna.load_study(study_name=pair, storage=self.run_dir.study_url(pair))
        summary = self._summarize(pair, study)
        tracking.close_study(context.tracking, study, summary)
        return summary

    def _new_tuner(self, contexts: dict[str, PairContext], trainable, callbacks: list,
                   tracking: SweepTracking) -> tune.Tuner:
        config = self.config
        sampler_class = optuna.samplers.TPESampler if config.search.sampler == "tpe" else optuna.samplers.RandomSampler
        searchers, schedulers, trial_configs = {}, {}, {}
        for pair, context in contexts.items():
            facts = self.pairs[pair]
            model, metric, mode = facts.model, facts.metric, facts.mode
            dataset = self.datasets[facts.dataset]
            trial_configs[pair] = trial_param_space(config, self.spaces[model], model, dataset, metric)
            base = resolve_config({**trial_configs[pair], "out": "unused"}, where=f"{pair} trial config")  # fail before Ray works
            storage = optuna.storages.RDBStorage(self.run_dir.study_url(pair))
            task = TaskFacts(model, facts.dataset, dataset.fingerprint, metric, base.text_encoder.path)
            # Only a new study is seeded: one that exists already had its first trials.
            new_study = not _study_exists(storage, pair)
            defaults = self.spaces[model].default_point(base)
            warm = plan_warm_start(self.earlier, task, self.spaces[model], defaults, top_k=config.search.warm_start_top_k,
                                   budget=config.budget.trials_per_pair) if new_study else WarmStart()
            # Without a warm start, a new study's first trial is the model's default config, so that a
            # small budget never ends below the defaults.
            first = warm.queued or ([defaults] if new_study and config.search.defaults_first and not warm else None)
            searchers[pair] = PruningAwareOptunaSearch(
                space=self.spaces[model].optuna_space(), metric=context.tune_metric, mode=mode,
                sampler=sampler_class(seed=config.search.seed), study_name=pair, storage=storage,
                points_to_evaluate=first,
                errors_dir=str(self.run_dir.tune_experiment), budget=config.budget.trials_per_pair,
            )
            study = searcher_study(searchers[pair])
            task.record(study)
            study.add_trials(warm.carried)
            for source in warm.sources:
                print(f"[{pair}] warm start from {source}", flush=True)
            if warm:
                tracking.tag_study(context.tracking, warm.tags())
            elif first:
                print(f"[{pair}] first trial: the model's default config, clipped into its search space", flush=True)
            seconds = config.search.budget_unit == "seconds"
            schedulers[pair] = pair_scheduler(
                config.search.scheduler, metric=context.tune_metric, mode=mode, unit=config.search.budget_unit,
                max_t=config.budget.max_trial_seconds if seconds else config.budget.max_epochs,
                grace_period=config.search.grace_period, reduction_factor=config.search.reduction_factor)
        resources = config.resources
        search = MatrixSearch(searchers, trial_configs, schedule=resources.schedule,
                              max_per_pair=resources.max_trials_per_pair, time_budget_s=config.budget.time_budget_s)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(search, max_concurrent=resources.max_concurrent_trials),
                scheduler=PairScheduler(schedulers), num_samples=config.budget.trials_per_pair * len(contexts),
                trial_dirname_creator=trial_dirname,
                # An inline trial's process keeps torch, DeepSpeed and its one-rank process group
                # for the next trial (Tune starts a fresh one after a failure).
                reuse_actors=next(iter(contexts.values())).shape.inline,
            ),
            run_config=tune.RunConfig(
                name=self.run_dir.tune_experiment.name, storage_path=str(self.run_dir.ray_dir),
                failure_config=tune.FailureConfig(max_failures=resources.max_failures),
                # A trial resumes from its latest epoch only: older ones would pile up (an
                # encoder's trainable state is tens of MB per epoch).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks, verbose=self.verbose,
            ),
        )


def _study_exists(storage: optuna.storages.RDBStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def trial_param_space(config: SweepConfig, space: SearchSpace, model: str, dataset: FeatureSet, metric: str) -> dict:
    """Every trial's train config before Optuna's suggestion is merged in: the sweep's `train:`
    section, the search space's fixed values and the `SWEEP_OWNED` keys (``out`` is the trial's
    folder, set by the trial itself)."""
    owned = {"model": model, "data": dataset.source, "seed": config.search.seed, "seeds": config.budget.seeds_per_trial,
             "epochs": config.budget.max_epochs,
             "selection_metric": metric, "zero_stage": config.deepspeed.zero_stage,
             "precision": config.deepspeed.precision}
    train = dict(config.train)
    if train.get("text_encoder", {}).get("path"):  # trials may run in other folders
        train["text_encoder"] = {**train["text_encoder"], "path": absolute_encoder_path(train["text_encoder"]["path"])}
    return {**train, **space.fixed_values(), **owned}


def _restored_tuner(experiment: Path, trainable, callbacks: list, verbose: int) -> tune.Tuner:
    """The sweep's Tuner from its saved state: unfinished trials continue from their last
    checkpoint; a trial that failed after all its retries stays failed (not run again)."""
    tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=False)
    # The saved run config holds the callbacks pickled at the first start (a stale tracking
    # server address, no driver to close studies): this start's replace them.
    run_config = restored_run_config(tuner)
    ours = (SweepConsole, TrialRunCloser, StudyWatcher, LostCheckpoints, DiskFullStop)
    run_config.callbacks = [c for c in run_config.callbacks if not isinstance(c, ours)] + callbacks
    run_config.verbose = verbose
    return tuner


def _check_study_names(run_dir: RunDir, pairs: dict) -> None:
    """Raises MsaError when the run directory holds studies this version would not name so: an
    older version named them otherwise (an npz after its stem), and resuming would start over."""
    found = [db.stem for db in run_dir.study_dbs()]
    if found and set(found) - set(pairs):
        raise MsaError(f"{run_dir.root}: its studies ({', '.join(found)}) are not this version's ({', '.join(pairs)}): "
                       f"it was made by msa-sweep {run_dir.layout_version()}, which named datasets otherwise; resume it "
                       f"with that version, or name the datasets as it did with a mapping in a new sweep")


def _make_run_dir(config: SweepConfig) -> RunDir:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = RunDir(Path(config.storage) / f"{config.name}-{stamp}")
    if run_dir.root.exists():
        raise MsaError(f"run directory {run_dir.root} already exists; wait a second or change name")
    run_dir.root.mkdir(parents=True)
    run_dir.config_file.write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
    run_dir.write_layout(metadata.version("msa-sweep"))
    return run_dir
