"""The docs site: the reference pages match the code (and a stale one is caught), the site
builds in MkDocs' strict mode, every page of the nav has its HTML and every internal link and
anchor in the built site resolves, and the README stays a front page."""
from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from msa.platform.reference import PAGES, stale_pages

README_LIMIT_BYTES = 10 * 1024


def _run_reference(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msa.platform.reference", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)


def test_the_committed_reference_pages_are_what_the_code_generates(repo_root):
    assert stale_pages(repo_root / "docs" / "reference") == [], (
        "regenerate the reference pages: python -m msa.platform.reference")


def test_a_stale_reference_page_fails_the_check_naming_it_until_regenerated(repo_root, tmp_path):
    pages = tmp_path / "reference"
    shutil.copytree(repo_root / "docs" / "reference", pages)
    assert _run_reference(repo_root, "--check", "--dir", str(pages)).returncode == 0
    config_page = pages / "config.md"
    # A key the code has but the page lost: what adding a config field without regenerating looks like.
    config_page.write_text("\n".join(line for line in config_page.read_text().splitlines()
                                     if not line.startswith("| `budget.max_epochs`")) + "\n")
    stale = _run_reference(repo_root, "--check", "--dir", str(pages))
    assert stale.returncode == 1
    assert stale.stderr.strip() == (f"{config_page} is stale: regenerate it with `python -m msa.platform.reference`")
    assert _run_reference(repo_root, "--dir", str(pages)).returncode == 0
    assert _run_reference(repo_root, "--check", "--dir", str(pages)).returncode == 0
    assert set(path.name for path in pages.iterdir()) == set(PAGES)


def test_every_config_key_and_every_command_is_in_the_reference(repo_root):
    config_page = (repo_root / "docs" / "reference" / "config.md").read_text()
    for key in ("budget.trials_per_pair", "search.grace_period", "search.reduction_factor", "resources.placement",
                "deepspeed.zero_stage", "tracking.uri", "ensemble.protocol", "text_encoder.freeze_layers",
                "text_encoder.cache_dir", "patience", "regression_loss"):
        assert f"| `{key}` |" in config_page, key
    assert re.search(r"\| `search.sampler` \| str \| `tpe` \| `tpe`, `random` \|", config_page)
    cli_page = (repo_root / "docs" / "reference" / "cli.md").read_text()
    for command in ("train", "data synth", "data inspect", "sweep", "run", "ensemble", "leaderboard", "registry",
                    "registry promote", "predict", "mlflow", "cache list", "cache clear", "models"):
        assert f"## `msa {command}`" in cli_page, command
    assert "| `--dry-run` |" in cli_page


class _Links(html.parser.HTMLParser):
    """The hrefs and element ids of one HTML page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        if tag == "a" and attributes.get("href"):
            self.hrefs.append(attributes["href"])


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values():
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_site_builds_strict_with_every_page_and_internal_link(repo_root, tmp_path):
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                           cwd=repo_root, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    nav = yaml.safe_load((repo_root / "mkdocs.yml").read_text())["nav"]
    pages = _nav_pages(nav)
    on_disk = sorted(str(p.relative_to(repo_root / "docs")) for p in (repo_root / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk, "every page is in the nav, and every nav entry is a page"
    parsed: dict[Path, _Links] = {}
    for html_file in site.rglob("*.html"):
        links = _Links()
        links.feed(html_file.read_text())
        parsed[html_file] = links
    for page in pages:
        built_page = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built_page in parsed, f"{page} has no built page"
    broken = []
    for html_file, links in parsed.items():
        if html_file.name == "404.html":
            continue
        for href in links.hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith("mailto:"):
                continue
            target = (html_file.parent / unquote(parts.path)).resolve() if parts.path else html_file
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{html_file.relative_to(site)}: {href}")
            elif parts.fragment and target in parsed and unquote(parts.fragment) not in parsed[target].ids:
                broken.append(f"{html_file.relative_to(site)}: {href} (no such anchor)")
    assert broken == []


def test_the_readme_is_a_front_page(repo_root):
    readme = (repo_root / "README.md").read_bytes()
    assert len(readme) <= README_LIMIT_BYTES, f"README.md is {len(readme)} bytes; the limit is {README_LIMIT_BYTES}"
    text = readme.decode()
    for must in ("make demo", "make test", "make test-fast", "make docs", "docs/"):
        assert must in text, must


def test_the_readme_example_config_has_only_real_keys(repo_root):
    from msa.platform.core.config import build_dataclass
    from msa.platform.sweep.config import SweepConfig
    from msa.platform.training.config import resolve_config

    (block,) = re.findall(r"```yaml\n(.*?)```", (repo_root / "README.md").read_text(), flags=re.S)
    config = build_dataclass(SweepConfig, yaml.safe_load(block), where="README.md")
    resolve_config({**config.train, "model": config.models[0], "data": "unused"}, where="README.md train:")
