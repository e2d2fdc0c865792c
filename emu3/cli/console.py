"""The console scripts of pyproject.toml ([project.scripts]): `emu3-generate`, `emu3-vqa`, ...

Each runs a command's `main()` and exits with status 0 when it returns: the mains return their
results (files written, answers) for Python callers, which a console script must not hand to
sys.exit (a non-None value there means failure). Each command imports its module when it runs, so
one command does not pay for another's imports.
"""

import importlib


def _command(module: str):
    def run() -> None:
        importlib.import_module(module).main()

    run.module = module
    return run


generate = _command("emu3.cli.generate_image")
vqa = _command("emu3.cli.vqa")
reconstruct = _command("emu3.cli.reconstruct")
benchmark = _command("emu3.cli.benchmark")
web_demo = _command("emu3.web.app")
prepare_vision_data = _command("train.prepare_vision_data")
prepare_vqa_data = _command("train.prepare_vqa_data")
merge_zero_shards = _command("train.merge_zero_shards")
sft = _command("train.sft")
