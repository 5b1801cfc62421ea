"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def config_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))
