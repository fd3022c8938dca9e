"""``scripts/check_breaking.sh`` (``make breaking``, run by ``make test``): buf breaking against
the right base in a worktree, a branch clone, a clone of main and a shallow clone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".venv" / "bin" / "buf"
PROTO = ROOT / "protos" / "pricing" / "v1" / "common.proto"


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / "scripts" / "check_breaking.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "BUF": str(BUF if BUF.exists() else shutil.which("buf"))},
        check=False,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with the project's protos, buf.yaml and script, main at two commits."""
    r = tmp_path / "repo"
    (r / "scripts").mkdir(parents=True)
    shutil.copytree(ROOT / "protos", r / "protos")
    shutil.copy(ROOT / "buf.yaml", r)
    shutil.copy(ROOT / "scripts" / "check_breaking.sh", r / "scripts")
    git(r, "init", "-q", "-b", "main")
    git(r, "add", ".")
    git(r, "commit", "-q", "-m", "first")
    (r / "README").write_text("second\n")
    git(r, "add", ".")
    git(r, "commit", "-q", "-m", "second")
    return r


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / "protos" / "pricing" / "v1" / "common.proto"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def breaking_edit(repo: Path) -> None:
    """Renumber Money.amount_minor: wire-incompatible."""
    edit(repo, "int64 amount_minor = 2;", "int64 amount_minor = 7;")


def test_branch_against_its_merge_base(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    edit(repo, "int64 amount_minor = 2;", "int64 amount_minor = 2;\n  string note = 9;")
    git(repo, "commit", "-qam", "additive")
    ok = check(repo)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "merge base with main" in ok.stdout
    breaking_edit(repo)
    git(repo, "commit", "-qam", "breaking")
    bad = check(repo)
    assert bad.returncode != 0
    assert "amount_minor" in bad.stdout + bad.stderr
    # main moved on meanwhile: still compared with the merge base, not with main's tip
    git(repo, "checkout", "-q", "main")
    (repo / "NEWS").write_text("x\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "main moves")
    git(repo, "checkout", "-q", "feature")
    assert check(repo).returncode != 0


def test_clean_clone_of_a_branch_uses_origin_main(repo: Path, tmp_path: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    breaking_edit(repo)
    git(repo, "commit", "-qam", "breaking")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "-b", "feature", str(repo), str(clone)], check=True)
    bad = check(clone)
    assert bad.returncode != 0
    assert "merge base with origin/main" in bad.stdout


def test_main_against_its_previous_commit(repo: Path, tmp_path: Path) -> None:
    breaking_edit(repo)
    git(repo, "commit", "-qam", "breaking on main")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    bad = check(clone)
    assert bad.returncode != 0
    assert "main's previous commit" in bad.stdout
    # a clone with one commit has no earlier contract: says so, passes
    shallow = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)], check=True
    )
    one = check(shallow)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "no earlier commit" in one.stdout
