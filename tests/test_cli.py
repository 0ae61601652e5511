"""The command line: cheap --help, one-line help per command, loud failures, user errors as one line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, assert_user_error, run_mixofshow

EXAMPLE = REPO / "configs" / "example.yaml"
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "gradio", "open_clip", "matplotlib")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """name -> (its help line in `mixofshow --help`, its own parser)."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {c.dest: c.help for c in action._choices_actions}
    return {name: (helps.get(name), sub) for name, sub in action.choices.items()}


def test_building_the_parser_imports_no_heavy_package():
    code = textwrap.dedent(f"""
        import json, sys
        from mixofshow.cli import build_parser
        parser = build_parser()
        for argv in (["--help"], *[[name, "--help"] for name in
                     parser._subparsers._group_actions[0].choices]):
            try:
                parser.parse_args(argv)
            except SystemExit:
                pass
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_subcommand_has_a_one_line_help_and_description():
    from mixofshow.cli import build_parser

    commands = _subcommands(build_parser())
    assert {"train", "sample", "fuse", "export", "import", "demo", "optimizers"} <= set(commands)
    for name, (help_line, sub) in commands.items():
        assert help_line and "\n" not in help_line, name
        assert sub.description, f"`mixofshow {name} --help` has no description"


def test_help_exits_0_and_lists_the_commands():
    result = run_mixofshow("--help")
    assert result.returncode == 0, result.stderr
    for name in ("train", "sample", "fuse", "export", "import", "demo", "optimizers"):
        assert f"    {name}" in result.stdout


def test_optimizers_lists_the_registry(capsys):
    from mixofshow.cli import main
    from mixofshow.optim.registry import SPECS

    assert main(["optimizers"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == sorted(SPECS)


def test_static_choices_match_the_library():
    from mixofshow.concepts.command import _FORMATS
    from mixofshow.sample.command import SCHEDULER_NAMES
    from mixofshow.sample.pipeline import SCHEDULERS

    assert sorted(SCHEDULER_NAMES) == sorted(SCHEDULERS)
    assert set(_FORMATS) == {"diffusers", "kohya"}


@pytest.mark.parametrize("kind", ["missing", "broken"])
def test_a_command_module_that_cannot_be_imported_fails_loudly(kind, tmp_path):
    pkg = tmp_path / "extra_cmds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    if kind == "broken":
        (pkg / "command.py").write_text("import a_module_that_does_not_exist_anywhere\n")
    code = (
        "import sys, mixofshow.cli as cli; cli._COMMANDS = cli._COMMANDS + ('extra_cmds.command',); "
        "sys.exit(cli.main(['--help']))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode not in (0, 2), result.stdout
    assert "CommandModuleError" in result.stderr and "extra_cmds.command" in result.stderr
    if kind == "broken":
        assert "a_module_that_does_not_exist_anywhere" in result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "optimizer.lr_unet=-1"], ["optimizer.lr_unet: expected a number >= 0, got -1"]),
        (["--set", "optimizer.lr_unet=.nan"], ["optimizer.lr_unet", "got nan"]),
        (["--set", "name.foo=1"], ["'name.foo'", "'name' is a value"]),
        (["--set", "lora.nope=1"], ["lora: unknown key 'nope'"]),
        (["--set", "lora.rank"], ["--set 'lora.rank'", "KEY=VALUE"]),
        (["--set", "=3"], ["KEY=VALUE"]),
        (["--set", "lora.rank=[1,"], ["--set lora.rank=[1,", "not a valid YAML value"]),
        (["--set", "train.batch_size=0"], ["train.batch_size: expected an integer >= 1, got 0"]),
        (["--max-steps", "0"], ["train.max_steps: expected an integer >= 1, got 0"]),
    ],
)
def test_train_config_mistakes_are_one_line_and_exit_2(args, needles, tmp_path):
    result = run_mixofshow("train", str(EXAMPLE), "--output-dir", str(tmp_path / "run"), *args)
    assert_user_error(result, *needles)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_train_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_mixofshow("train", str(EXAMPLE), "--output-dir", str(blocker))
    assert_user_error(result, f"output_dir {blocker}: exists and is a file")
    result = run_mixofshow("train", str(EXAMPLE), "--output-dir", str(blocker / "sub" / "run"))
    assert_user_error(result, str(blocker / "sub" / "run"), f"under {blocker}, which is not a folder")


def test_sample_fuse_export_import_check_their_outputs_first(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    concept = tmp_path / "c.safetensors"
    from mixofshow.utils.io import save_safetensors

    save_safetensors(concept, {}, {"format": "not-a-concept"})  # never read: the output check comes first
    result = run_mixofshow("export", str(concept), "--format", "kohya", "--output", str(blocker / "x.safetensors"))
    assert_user_error(result, f"--output {blocker / 'x.safetensors'}", "not a folder")
    result = run_mixofshow("import", str(tmp_path / "x.pth"), str(blocker / "x.safetensors"), "--base-model", "embedded")
    assert_user_error(result, str(blocker / "x.safetensors"), "not a folder")
    result = run_mixofshow("sample", "--concept", str(concept), "--prompt", "a photo", "--base-model", "embedded",
                           "--output-dir", str(blocker))
    assert_user_error(result, f"--output-dir {blocker}: exists and is a file")
    fuse_cfg = tmp_path / "fuse.yaml"
    fuse_cfg.write_text(f"concepts: [{{file: {concept}}}]\noutput: {blocker / 'sub' / 'f.safetensors'}\n")
    result = run_mixofshow("fuse", str(fuse_cfg))
    assert_user_error(result, f"output {blocker / 'sub' / 'f.safetensors'}", "not a folder")
    fuse_cfg.write_text(f"concepts: [{{file: {concept}}}]\noutput: {tmp_path / 'f.safetensors'}\n"
                        f"diffusers_output: {blocker}\n")
    result = run_mixofshow("fuse", str(fuse_cfg))
    assert_user_error(result, f"diffusers_output {blocker}: exists and is a file")


def test_not_writable_and_full_output_locations_exit_2(tmp_path, monkeypatch, capsys):
    """Root may write anywhere, so "not writable" is simulated by monkeypatching os.access (and
    "no space" by shutil.disk_usage), in-process through cli.main."""
    import shutil

    from mixofshow.cli import main

    target = tmp_path / "runs" / "x"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw))
    assert main(["train", str(EXAMPLE), "--output-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {target}: not writable (no write permission in {tmp_path})" in err
    monkeypatch.setattr(os, "access", real_access)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1024))
    assert main(["train", str(EXAMPLE), "--output-dir", str(target)]) == 2
    assert f"output_dir {target}: no space left" in capsys.readouterr().err
    assert not target.exists()
