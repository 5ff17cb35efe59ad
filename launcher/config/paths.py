"""Where the shipped spec and DeepSpeed configs live, and how paths are shown to users.

The default spec and DeepSpeed JSON resolve relative to the project (the checkout holding
`launcher/` and `ds_configs/`), not the working directory, so they are found from any folder;
data paths and `out_dir` in a spec stay relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The checkout: the folder holding launcher/, model/, data_pipeline/ and ds_configs/."""
SPECS = PROJECT_ROOT / "launcher" / "specs"
DEFAULT_SPEC = SPECS / "shakespeare_char.yaml"
DS_CONFIGS = PROJECT_ROOT / "ds_configs"
if not DS_CONFIGS.is_dir():  # installed without the checkout: the working directory's
    DS_CONFIGS = Path("ds_configs")
DEFAULT_DS_CONFIG = DS_CONFIGS / "zero2.json"


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a file (missing, a directory, unreadable), or None."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory, not a file"
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def find_config(path: Path) -> Path:
    """A config path as given; a relative one missing here is looked up in the project too, so
    `--ds_config ds_configs/zero3.json` finds the shipped file from any folder."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    shipped = PROJECT_ROOT / path
    return shipped if shipped.exists() else path


def find_spec(path: Path) -> Path:
    """A run spec as find_config finds it, or a shipped spec by its name (`--spec gpt2_124m`)."""
    found = find_config(path)
    named = SPECS / f"{path}.yaml"
    if not found.exists() and len(Path(path).parts) == 1 and named.is_file():
        return named
    return found


def shipped_specs() -> list[str]:
    """The names of the specs in launcher/specs/."""
    return sorted(p.stem for p in SPECS.glob("*.yaml"))
