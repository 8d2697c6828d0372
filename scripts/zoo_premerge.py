# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Helpers of the model-zoo premerge rehearsal (scripts/zoo_premerge.sh).

- :func:`write_zoo_unit_test` writes the zoo's unit test of the bundle (``ci/unit_tests/test_<name>.py`` in the zoo,
  ``<export folder>/ci/unit_tests/test_<name>.py`` beside the exported ``<export folder>/<name>/``, as in the zoo's
  tree, so that it is not part of the bundle) from scripts/zoo_unit_test_template.py;
- ``python scripts/zoo_premerge.py hooks BUNDLE_FOLDER [--name NAME] [--maxkb 1024]`` runs the zoo's pre-commit
  hooks (.pre-commit-config.yaml, pre-commit-hooks v4.6.0: check-added-large-files --maxkb=1024,
  pretty-format-json --no-sort-keys --indent=4, end-of-file-fixer, trailing-whitespace, ...) through their Python
  entry points on a copy of the folder staged (``git add``) at ``models/<name>/`` in a temporary git repository,
  as the zoo's pre-commit does on a pull request's added files; nothing is changed in the folder itself.
- ``python scripts/zoo_premerge.py unit_test BUNDLE_FOLDER [--name NAME]`` writes the unit test (prints its path).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "zoo_unit_test_template.py")
TEMPLATE_NAME = "sagan_xray_anomaly"
UNIT_TEST_DIR = os.path.join("ci", "unit_tests")  # beside the bundle folder, as in the zoo (models/<name>)

# the zoo's .pre-commit-config.yaml (pre-commit-hooks rev v4.6.0): hook id -> (module, args, file filter)
# filters: "all" every staged file, "text" text files, "json"/"yaml"/"python" by extension, "exec" executable text
HOOKS = [
    ("check-added-large-files", "check_added_large_files", ["--maxkb={maxkb}"], "all"),
    ("end-of-file-fixer", "end_of_file_fixer", [], "text"),
    ("trailing-whitespace", "trailing_whitespace_fixer", [], "text_no_weights"),
    ("check-yaml", "check_yaml", [], "yaml"),
    ("check-docstring-first", "check_docstring_first", [], "python"),
    ("check-executables-have-shebangs", "check_executables_have_shebangs", [], "exec"),
    ("check-case-conflict", "check_case_conflict", [], "all"),
    ("detect-private-key", "detect_private_key", [], "text"),
    ("pretty-format-json", "pretty_format_json", ["--no-sort-keys", "--indent=4"], "json"),
    ("mixed-line-ending", "mixed_line_ending", [], "text"),
]


def class_name(name: str) -> str:
    """``sagan_xray_anomaly`` -> ``SaganXrayAnomaly`` (the test case's class)."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[_\-]", name) if part)


def zoo_unit_test_source(name: str) -> str:
    """The unit test of bundle ``name`` in the zoo's format (see scripts/zoo_unit_test_template.py)."""
    with open(TEMPLATE) as f:
        text = f.read()
    text = text.replace(f"Test{class_name(TEMPLATE_NAME)}", f"Test{class_name(name)}")
    return text.replace(TEMPLATE_NAME, name)


def write_zoo_unit_test(bundle_folder: str, name: str) -> str:
    """Writes ``<folder above bundle_folder>/ci/unit_tests/test_<name>.py``, the zoo's unit test of the bundle, and
    returns its path: the export folder mirrors the zoo's tree (``<name>/`` is ``models/<name>/``), so the test is
    not inside the bundle (nor its zip). scripts/zoo_premerge.sh copies it to the zoo's ``ci/unit_tests/``, where
    ``python ci/unit_tests/runner.py --b <name>`` runs it; elsewhere ``python -m unittest`` runs it (not pytest,
    which would take the zoo's ``test_order`` helper for a test)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(bundle_folder)), UNIT_TEST_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"test_{name}.py")
    with open(path, "w") as f:
        f.write(zoo_unit_test_source(name))
    return path


def _is_text(path: str) -> bool:
    try:
        from identify import identify  # what pre-commit itself uses to type files

        return "text" in identify.tags_from_path(path)
    except ImportError:
        with open(path, "rb") as f:
            return b"\0" not in f.read(8192)


def _selected(path: str, kind: str) -> bool:
    if kind == "all":
        return True
    if kind == "json":
        return path.endswith(".json")
    if kind == "yaml":
        return path.endswith((".yaml", ".yml"))
    if kind == "python":
        return path.endswith(".py")
    text = _is_text(path)
    if kind == "text_no_weights":  # the zoo's trailing-whitespace hook: exclude: '.*\.(ts|pt)$'
        return text and not re.match(r".*\.(ts|pt)$", path)
    if kind == "exec":
        return text and os.access(path, os.X_OK)
    return text


# what the zoo's CI writes into a bundle folder (ci/prepare_schema.py, verify_bundle.py): not part of a commit
CI_ARTIFACTS = (os.path.join("eval", "schema.json"), os.path.join("models", "verify_model.ts"))


def _hosted_files(bundle_folder: str) -> set[str]:
    """The paths that large_files.yml lists: hosted elsewhere, never committed to the zoo (nor in the zip)."""
    path = os.path.join(bundle_folder, "large_files.yml")
    if not os.path.isfile(path):
        return set()
    import yaml

    entries = (yaml.safe_load(open(path)) or {}).get("large_files") or []
    return {os.path.normpath(entry["path"]) for entry in entries}


def _not_committed(bundle_folder: str):
    left_out = set(CI_ARTIFACTS) | _hosted_files(bundle_folder)

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = os.path.relpath(folder, bundle_folder)
        return {n for n in names if n == "__pycache__" or os.path.normpath(os.path.join(rel, n)) in left_out}

    return ignore


def run_hooks(bundle_folder: str, name: str, maxkb: int = 1024, gitignore: str | None = None) -> int:
    """Runs :data:`HOOKS` on the staged copy of ``bundle_folder``; prints one PASS/FAIL line per hook (and the
    hook's own output on failure); returns the number of failed hooks. With ``gitignore`` (the zoo's .gitignore),
    also fails when it would keep any of the bundle's files out of a commit."""
    try:
        importlib.import_module("pre_commit_hooks")
    except ImportError:
        print("FAIL pre-commit hooks: the pre-commit-hooks package is not installed (pip install pre-commit-hooks)")
        return 1
    repo = tempfile.mkdtemp(prefix="zoo_hooks.")
    failed = 0
    try:
        shutil.copytree(bundle_folder, os.path.join(repo, "models", name), ignore=_not_committed(bundle_folder))
        git = ["git", "-c", "user.name=zoo", "-c", "user.email=zoo@localhost", "-c", "core.autocrlf=false"]
        subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
        if gitignore:
            shutil.copy(gitignore, os.path.join(repo, ".gitignore"))
        subprocess.run([*git, "add", "-A", "models"], cwd=repo, check=True)
        staged = subprocess.run(
            ["git", "diff", "--staged", "--name-only", "-z"], cwd=repo, check=True, capture_output=True, text=True
        ).stdout.split("\0")
        staged = [f for f in staged if f]
        if gitignore:
            files = {
                os.path.relpath(os.path.join(folder, f), repo)
                for folder, dirs, names in os.walk(os.path.join(repo, "models"))
                for f in names
                if "__pycache__" not in folder
            }
            ignored = sorted(files - set(staged))
            failed += bool(ignored)
            print(f"{'FAIL' if ignored else 'PASS'} the zoo's .gitignore keeps all {len(files)} files", end="")
            print(f"; it ignores: {ignored}" if ignored else "")
        staged = sorted(f for f in staged if not re.match(r".*\.ipynb$", f))  # the zoo's global exclude
        for hook_id, module, args, kind in HOOKS:
            files = [f for f in staged if _selected(os.path.join(repo, f), kind)]
            argv = [a.format(maxkb=maxkb) for a in args] + files
            proc = subprocess.run(
                [sys.executable, "-c", f"import sys; from pre_commit_hooks.{module} import main; sys.exit(main())",
                 *argv],
                cwd=repo, capture_output=True, text=True,
            )  # fmt: skip
            status = "PASS" if proc.returncode == 0 else "FAIL"
            failed += proc.returncode != 0
            extra = "".join(f" {a.format(maxkb=maxkb)}" for a in args)
            print(f"{status} pre-commit {hook_id}{extra} ({len(files)} files)")
            if proc.returncode != 0:
                out = (proc.stdout + proc.stderr).strip()
                print("    " + out[-3000:].replace("\n", "\n    "))
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("hooks", "unit_test"))
    parser.add_argument("bundle_folder")
    parser.add_argument("--name", help="bundle name (default: the folder's name)")
    parser.add_argument("--maxkb", type=int, default=1024, help="check-added-large-files --maxkb (the zoo's: 1024)")
    parser.add_argument("--gitignore", help="hooks: the zoo's .gitignore, to check that it drops none of the files")
    parser.add_argument("--to", help="unit_test: write the test to this path instead of <folder>/../ci/unit_tests/")
    args = parser.parse_args(argv)
    name = args.name or os.path.basename(os.path.normpath(args.bundle_folder))
    if args.command == "unit_test":
        if args.to:
            with open(args.to, "w") as f:
                f.write(zoo_unit_test_source(name))
        print(args.to or write_zoo_unit_test(args.bundle_folder, name))
        return 0
    return 1 if run_hooks(args.bundle_folder, name, args.maxkb, args.gitignore) else 0


if __name__ == "__main__":
    sys.exit(main())
