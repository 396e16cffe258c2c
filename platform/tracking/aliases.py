"""Which version of a registered model is `champion`: chosen on valid scores, not by date.

A new version of ``msa-<model>-<dataset>`` (or ``msa-ensemble-<dataset>``) becomes ``champion``
only when it beats the current champion on the same data (the dataset's SHA-256 fingerprint)
and the same selection metric, on valid: a seed group's seed mean, an ensemble's cross-fitted
estimate (the ``valid_<metric>`` tags its registration wrote). Otherwise it becomes
``challenger``. Versions whose data or metric differ from the champion's are not compared:
they become challenger, and `promote` moves champion to them by hand. Every version's
``msa.alias_reason`` tag says why it got its alias; a champion that lost its alias says to
whom (``msa.replaced_by``).

Two sweeps registering the same name at the same moment can both read the old champion and
both claim the alias; the later write wins. Sweeps of one name are expected to run one at a time.
"""
from __future__ import annotations

import getpass
import math
import socket
import time
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import direction, is_better

CHAMPION, CHALLENGER = "champion", "challenger"
REASON_TAG = "msa.alias_reason"
REPLACED_TAG = "msa.replaced_by"
DATASET_TAG, FINGERPRINT_TAG, METRIC_TAG = "dataset", "dataset_fingerprint", "selection_metric"
PREFIX = "msa-"


def dataset_of(name: str) -> str:
    """The dataset in a registered name: ``msa-<model>-<dataset>`` (model names have no hyphen)."""
    return name.split("-", 2)[2] if name.startswith(PREFIX) and name.count("-") >= 2 else ""


@dataclass(frozen=True)
class Standing:
    """What a version is compared on: its data, selection metric and valid score of that metric."""

    version: str
    dataset: str
    fingerprint: str
    metric: str
    score: float | None

    @classmethod
    def of(cls, name: str, version) -> "Standing":
        tags = version.tags or {}
        metric = tags.get(METRIC_TAG, "")
        return cls(version=str(version.version), dataset=tags.get(DATASET_TAG) or dataset_of(name),
                   fingerprint=tags.get(FINGERPRINT_TAG, ""), metric=metric, score=tag_number(tags.get(f"valid_{metric}")))

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


def decide(name: str, new: Standing, champion: Standing | None) -> tuple[str, str]:
    """(alias, reason) for a newly registered version `new` against the current `champion`."""
    if new.dataset != dataset_of(name):
        return CHALLENGER, f"never champion: it is a model of dataset {new.dataset}, registered under {name}"
    if champion is None:
        return CHAMPION, f"no champion of {name} to beat"
    why_not = new.not_comparable_with(name, champion)
    if why_not:
        return CHALLENGER, f"not compared with champion version {champion.version}: {why_not}"
    shown = lambda score: "undefined" if score is None else f"{score:.6g}"  # noqa: E731
    figures = (f"valid {new.metric} {shown(new.score)} against {shown(champion.score)} of champion version "
               f"{champion.version} ({direction(new.metric)} is better)")
    if is_better(new.metric, new.score, champion.score):  # an undefined score never wins
        return CHAMPION, f"beats the champion: {figures}"
    return CHALLENGER, f"does not beat the champion: {figures}"


def _aliased(mlflow_client, name: str, alias: str):
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def assign(mlflow_client, name: str, version: str) -> tuple[str, str]:
    """Give the registered `version` of `name` its alias by the policy above and tag why; a
    version that already has its reason (a resumed sweep registering again) keeps its alias.
    Returns (alias, reason); the alias is ``""`` for a decided version that has since lost it."""
    registered = mlflow_client.get_model_version(name, version)
    if REASON_TAG in (registered.tags or {}):
        return next(iter(registered.aliases or []), ""), registered.tags[REASON_TAG]
    champion = _aliased(mlflow_client, name, CHAMPION)
    alias, reason = decide(name, Standing.of(name, registered), None if champion is None else Standing.of(name, champion))
    mlflow_client.set_model_version_tag(name, version, REASON_TAG, reason)
    if alias == CHAMPION and champion is not None:
        mlflow_client.set_model_version_tag(name, champion.version, REPLACED_TAG, f"version {version}: {reason}")
    mlflow_client.set_registered_model_alias(name, alias, version)
    return alias, reason


def promote(mlflow_client, name: str, version: str, *, reason: str, new_data: bool = False) -> str:
    """Move `champion` of `name` to `version` by hand, recording who asked, when and why in the
    version's tags. Returns what was done, as a sentence.

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
    target = Standing.of(name, versions[str(version)])
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
    record = {"msa.promoted_by": who, "msa.promoted_at": when, "msa.promoted_reason": reason,
              REASON_TAG: f"promoted by hand by {who} at {when}: {reason}"}
    for key, value in record.items():
        mlflow_client.set_model_version_tag(name, str(version), key, value)
    if champion is not None:
        mlflow_client.set_model_version_tag(name, champion.version, REPLACED_TAG,
                                            f"version {version}: promoted by hand by {who} at {when}: {reason}")
    if CHALLENGER in (versions[str(version)].aliases or []):
        mlflow_client.delete_registered_model_alias(name, CHALLENGER)
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
    before = f" (was version {champion.version})" if champion is not None else ""
    return f"{name} version {version} is champion{before}; recorded: promoted by {who}: {reason}"
