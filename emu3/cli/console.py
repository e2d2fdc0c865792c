"""The console scripts of pyproject.toml ([project.scripts]): `emu3-generate`, `emu3-vqa`, ...

Each runs a command's `main()` and exits with status 0 when it returns: the mains return their
results (files written, answers) for Python callers, which a console script must not hand to
sys.exit (a non-None value there means failure). Imports happen per command, so one command does
not pay for another's.
"""

import importlib


def _run(module: str) -> None:
    importlib.import_module(module).main()


def generate() -> None:
    _run("emu3.cli.generate_image")


def vqa() -> None:
    _run("emu3.cli.vqa")


def reconstruct() -> None:
    _run("emu3.cli.reconstruct")


def benchmark() -> None:
    _run("emu3.cli.benchmark")


def web_demo() -> None:
    _run("emu3.web.app")


def prepare_vision_data() -> None:
    _run("train.prepare_vision_data")


def prepare_vqa_data() -> None:
    _run("train.prepare_vqa_data")


def merge_zero_shards() -> None:
    _run("train.merge_zero_shards")


def sft() -> None:
    _run("train.sft")
