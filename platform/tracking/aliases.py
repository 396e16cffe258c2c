"""Which version of a registered model is `champion`: chosen on valid scores, not by date, and
the same whatever order concurrent registrations write in.

The champion of ``msa-<model>-<dataset>`` (or ``msa-ensemble-<dataset>``) is a function of all
its versions' tags, never of the order they were written in: among the versions of the name's
dataset trained on the same data (the dataset's SHA-256 fingerprint) and selected on the same
metric as the line's anchor, the best on valid (a seed group's seed mean, an ensemble's
cross-fitted estimate: the ``valid_<metric>`` tags its registration wrote); a tie goes to the
older version. The anchor is the oldest such version, or the version last promoted by hand
(`promote`): a promotion is an override, so only versions registered after it are compared with
the promoted one. Versions whose data or metric differ from the anchor's are not compared: they
become challenger, and `promote` moves champion to them by hand.

Every registration recomputes the champion from all versions and moves the alias only if it
differs, then reads again until what it reads agrees with its decision (`settle`). Whatever order
concurrent registrations of one name write in, the last writer has read every version created
before its last read, so the alias ends on the same answer. Every version's ``msa.alias_reason``
tag says what it was compared with; a champion that lost its alias says to whom
(``msa.replaced_by``).
"""
from __future__ import annotations

import calendar
import getpass
import math
import socket
import time
import dataclasses
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import direction, loss_of

CHAMPION, CHALLENGER = "champion", "challenger"
REASON_TAG = "msa.alias_reason"
REPLACED_TAG = "msa.replaced_by"
PROMOTION_TAG = "msa.promotion"  # the how-many-th promotion by hand of the name this version got
PROMOTED_OVER_TAG = "msa.promoted_over"  # the newest version of the name when it was promoted
PROMOTED_AT_TAG = "msa.promoted_at"
DATASET_TAG, FINGERPRINT_TAG, METRIC_TAG = "dataset", "dataset_fingerprint", "selection_metric"
PREFIX = "msa-"
SETTLE_ROUNDS = 50


def dataset_of(name: str) -> str:
    """The dataset in a registered name: ``msa-<model>-<dataset>`` (model names have no hyphen)."""
    return name.split("-", 2)[2] if name.startswith(PREFIX) and name.count("-") >= 2 else ""


@dataclass(frozen=True)
class Standing:
    """What a version is compared on (its data, selection metric and valid score of that metric)
    and whether it was promoted by hand: the how-many-th promotion of its name, over which
    versions, when."""

    version: str
    dataset: str
    fingerprint: str
    metric: str
    score: float | None
    promotion: int = 0
    promoted_over: int = 0
    promoted_at: str = ""

    @property
    def number(self) -> int:
        return int(self.version)

    @classmethod
    def of(cls, name: str, version) -> "Standing":
        tags = version.tags or {}
        metric = tags.get(METRIC_TAG, "")
        promoted_at = tags.get(PROMOTED_AT_TAG, "")
        return cls(version=str(version.version), dataset=tags.get(DATASET_TAG) or dataset_of(name),
                   fingerprint=tags.get(FINGERPRINT_TAG, ""), metric=metric, score=tag_number(tags.get(f"valid_{metric}")),
                   promotion=int(tags.get(PROMOTION_TAG) or (1 if promoted_at else 0)),
                   promoted_over=int(tags.get(PROMOTED_OVER_TAG) or 0), promoted_at=promoted_at)

    def not_comparable_with(self, name: str, champion: "Standing") -> str:
        """Why this version cannot be ranked against `champion` (``""`` when it can)."""
        if self.fingerprint != champion.fingerprint:
            return (f"it was trained on other data (dataset SHA-256 {self.fingerprint[:12] or 'unknown'}) than "
                    f"champion version {champion.version} ({champion.fingerprint[:12] or 'unknown'})")
        if self.metric != champion.metric:
            return f"it was selected on valid {self.metric}, champion version {champion.version} on valid {champion.metric}"
        return ""


def tag_number(text: str | None) -> float | None:
    """A score recorded as a version tag; ``None`` where it is absent, undefined or not finite."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def standings(name: str, versions) -> list[Standing]:
    """The standings of all `versions` of `name`, oldest first. A promotion recorded by msa-sweep
    0.5.0 has no ``msa.promoted_over``: it was made over the versions created by its time."""
    listed = sorted((Standing.of(name, v) for v in versions), key=lambda s: s.number)
    created = {str(v.version): v.creation_timestamp for v in versions}
    out = []
    for s in listed:
        if s.promotion and not s.promoted_over:
            at = calendar.timegm(time.strptime(s.promoted_at, "%Y-%m-%dT%H:%M:%SZ"))
            s = dataclasses.replace(s, promoted_over=max(
                [o.number for o in listed if created[o.version] <= (at + 1) * 1000] + [s.number]))
        out.append(s)
    return out


def compared(name: str, listed: list[Standing]) -> tuple[Standing | None, list[Standing]]:
    """(the anchor, the versions ranked for champion) among `listed`: the anchor is the last
    promoted version, or else the oldest of the name's dataset; the ranked ones share its data and
    metric and, after a promotion, were registered after it (the promoted one included)."""
    eligible = [s for s in listed if s.dataset == dataset_of(name)]
    if not eligible:
        return None, []
    promoted = max((s for s in eligible if s.promotion), key=lambda s: (s.promotion, s.promoted_at), default=None)
    anchor = promoted or eligible[0]
    ranked = [s for s in eligible if not s.not_comparable_with(name, anchor)
              and (promoted is None or s is promoted or s.number > promoted.promoted_over)]
    return anchor, ranked


def champion_of(name: str, listed: list[Standing]) -> Standing | None:
    """The champion `listed` (all versions of `name`) makes: the best ranked version on valid, the
    older on a tie; an undefined score never beats a defined one. ``None``: no version of the
    name's dataset."""
    _, ranked = compared(name, listed)
    return min(ranked, key=lambda s: (loss_of(s.metric, s.score), s.number), default=None)


def _figures(new: Standing, old: Standing) -> str:
    shown = lambda score: "undefined" if score is None else f"{score:.6g}"  # noqa: E731
    return (f"valid {new.metric} {shown(new.score)} against {shown(old.score)} of champion version "
            f"{old.version} ({direction(new.metric)} is better)")


def reason_for(name: str, new: Standing, listed: list[Standing]) -> str:
    """Why `new` holds the alias it holds among `listed` (all versions of `name`, `new` included),
    naming what it was compared with."""
    if new.dataset != dataset_of(name):
        return f"never champion: it is a model of dataset {new.dataset}, registered under {name}"
    champion = champion_of(name, listed)
    anchor, ranked = compared(name, listed)
    if champion.version == new.version:
        others = [s for s in ranked if s.version != new.version]
        if not others:
            return f"no champion of {name} to beat"
        runner_up = min(others, key=lambda s: (loss_of(s.metric, s.score), s.number))
        return f"beats the champion: {_figures(new, runner_up)}"
    if anchor.promotion and new.number <= anchor.promoted_over and new.version != anchor.version:
        return (f"not compared with champion version {champion.version}: version {anchor.version} was promoted by hand "
                f"over every version up to {anchor.promoted_over}")
    why_not = new.not_comparable_with(name, champion)
    if why_not:
        return f"not compared with champion version {champion.version}: {why_not}"
    return f"does not beat the champion: {_figures(new, champion)}"


def _aliased(mlflow_client, name: str, alias: str):
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _written(write, *arguments) -> None:
    """`write(*arguments)`, tried again when a concurrent writer of the same tag or alias made the
    server's insert collide (MLflow's SQL store reads, then inserts: two at once break the
    unique key). The retry updates the row the other one inserted."""
    for attempt in range(5):
        try:
            return write(*arguments)
        except MlflowException as exc:
            if attempt == 4 or not any(mark in str(exc) for mark in ("UNIQUE constraint", "IntegrityError", "Duplicate")):
                raise
            time.sleep(0.05 * (attempt + 1))


def settle(mlflow_client, name: str) -> list[Standing]:
    """Move `champion` of `name` to the version `champion_of` gives, tagging the one it replaces
    with whom, until a read finds the alias where that read says it belongs. Returns the
    standings of that last read.

    Raises:
        MsaError: the alias kept moving for `SETTLE_ROUNDS` reads (writers that never agree)."""
    for _ in range(SETTLE_ROUNDS):
        aliases = mlflow_client.get_registered_model(name).aliases or {}
        versions = mlflow_client.search_model_versions(f"name = '{name}'")
        listed = standings(name, versions)
        best = champion_of(name, listed)
        current = aliases.get(CHAMPION)
        if best is None or str(current) == best.version:
            return listed
        if best.promotion and best.promotion == max(s.promotion for s in listed):
            why = next(v.tags.get(REASON_TAG, "") for v in versions if str(v.version) == best.version)
        else:
            why = reason_for(name, best, listed)
        if current is not None:
            _written(mlflow_client.set_model_version_tag, name, str(current), REPLACED_TAG, f"version {best.version}: {why}")
        if str(aliases.get(CHALLENGER)) == best.version:
            mlflow_client.delete_registered_model_alias(name, CHALLENGER)
        _written(mlflow_client.set_registered_model_alias, name, CHAMPION, best.version)
    raise MsaError(f"the champion of {name} did not settle after {SETTLE_ROUNDS} reads: other writers keep moving it")


def assign(mlflow_client, name: str, version: str) -> tuple[str, str]:
    """Settle `champion` of `name` now that `version` is registered, then tag `version` with what
    it was compared with (`reason_for`, on the settled standings) and make it challenger if it is
    not champion. A version that already has its reason (a resumed sweep registering again)
    keeps it. Returns (alias, reason); the alias is ``""`` for a version that holds neither."""
    registered = mlflow_client.get_model_version(name, version)
    listed = settle(mlflow_client, name)
    reason = (registered.tags or {}).get(REASON_TAG)
    if reason is None:
        reason = reason_for(name, next(s for s in listed if s.version == str(version)), listed)
        _written(mlflow_client.set_model_version_tag, name, str(version), REASON_TAG, reason)
        champion = champion_of(name, listed)
        if champion is None or champion.version != str(version):
            _written(mlflow_client.set_registered_model_alias, name, CHALLENGER, str(version))
    held = [alias for alias, number in (mlflow_client.get_registered_model(name).aliases or {}).items()
            if str(number) == str(version)]
    return (CHAMPION if CHAMPION in held else next(iter(held), "")), reason


def promote(mlflow_client, name: str, version: str, *, reason: str, new_data: bool = False) -> str:
    """Move `champion` of `name` to `version` by hand, recording who asked, when and why in the
    version's tags. The promotion stands until a version registered after it beats it. Returns
    what was done, as a sentence.

    Raises:
        MsaError: an unknown name or version; a version of another dataset than its name says;
            one trained on other data than the champion (unless `new_data`); an empty reason.
            Nothing changes then."""
    if not reason.strip():
        raise MsaError("promote: --reason is empty; say why champion moves (it is recorded in the version's tags)")
    versions = {str(v.version): v for v in mlflow_client.search_model_versions(f"name = '{name}'")}
    if not versions:
        raise MsaError(f"promote: no registered model {name!r} (msa registry lists them)")
    if str(version) not in versions:
        raise MsaError(f"promote: {name} has no version {version} (versions: {', '.join(sorted(versions, key=int))})")
    listed = standings(name, versions.values())
    target = next(s for s in listed if s.version == str(version))
    if target.dataset != dataset_of(name):
        raise MsaError(f"promote: version {version} of {name} is a model of dataset {target.dataset}, "
                       f"not {dataset_of(name)}: it cannot be {name}'s champion")
    champion = _aliased(mlflow_client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version):
        return f"{name} version {version} is already champion; nothing changed"
    if champion is not None:
        current = Standing.of(name, champion)
        if target.fingerprint != current.fingerprint and not new_data:
            raise MsaError(f"promote: dataset fingerprint mismatch: version {version} of {name} was trained on data "
                           f"{target.fingerprint[:12] or 'unknown'}, champion version {champion.version} on "
                           f"{current.fingerprint[:12] or 'unknown'}; pass --new-data to make it champion anyway")
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"msa.promoted_by": who, PROMOTED_AT_TAG: when, "msa.promoted_reason": reason,
              REASON_TAG: f"promoted by hand by {who} at {when}: {reason}",
              PROMOTED_OVER_TAG: str(max(s.number for s in listed)),
              PROMOTION_TAG: str(1 + max(s.promotion for s in listed))}
    for key, value in record.items():
        _written(mlflow_client.set_model_version_tag, name, str(version), key, value)
    settled = champion_of(name, settle(mlflow_client, name))
    before = f" (was version {champion.version})" if champion is not None else ""
    if settled.version != str(version):
        return (f"{name} version {version} was promoted{before}, but version {settled.version}, registered since, "
                f"beats it and is champion; recorded: promoted by {who}: {reason}")
    return f"{name} version {version} is champion{before}; recorded: promoted by {who}: {reason}"
