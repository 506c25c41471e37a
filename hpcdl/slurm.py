"""Fill the sbatch templates in ``slurm/`` and submit them with ``sbatch``.

A template is a complete job script with ``{{ name }}`` placeholders. Its
parameters are declared in lines that start with ``## param``::

    ## param nodes=1 | Nodes to allocate.
    ## param partition= | Partition; empty uses the cluster's default.
    ## param train_args | Arguments for hpcdl train (required: no '=').

A declaration without ``=`` makes the parameter required. The defaults ``@venv``
and ``@cwd`` stand for the virtual environment of the running hpcdl and the
current directory. Rendering removes every line that starts with ``##``, and
leaves out each ``#SBATCH`` line whose placeholders are all empty, so that sbatch
falls back to the cluster's default for that option.

Example:
    >>> script = render_template("cpu-single-node", {"ntasks_per_node": "4", "time": "00:10:00"})
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcdl.errors import ConfigError

TEMPLATE_SUFFIX = ".sbatch"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_DECLARATION = re.compile(r"^## param\s+([A-Za-z_][A-Za-z0-9_]*)(?:=([^|]*))?(?:\|\s*(.*))?$")

# sbatch --time formats: minutes, minutes:seconds, hours:minutes:seconds,
# days-hours, days-hours:minutes and days-hours:minutes:seconds.
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class TemplateParam:
    """One parameter a template declares: its name, default (None when required) and help."""

    name: str
    default: str | None
    help: str


def _check_positive_int(name: str, value: str, minimum: int = 1) -> None:
    if not value.isdigit() or int(value) < minimum:
        raise ConfigError(f"Invalid {name}={value!r}: expected an integer >= {minimum}.")


def _check_time(name: str, value: str) -> None:
    if not _SLURM_TIME.match(value):
        raise ConfigError(f"Invalid {name}={value!r}: expected a Slurm time limit such as 30, 00:30:00 "
                          "or 1-00:00:00 (minutes, HH:MM:SS or D-HH:MM:SS).")


def _check_name(name: str, value: str) -> None:
    if not _SLURM_NAME.match(value):
        raise ConfigError(f"Invalid {name}={value!r}: use letters, digits and '_.+-' only.")


def _check_node_counts(name: str, value: str) -> None:
    counts = value.split()
    if not counts:
        raise ConfigError(f"Invalid {name}={value!r}: give node counts separated by spaces, e.g. '1 2 4'.")
    for count in counts:
        _check_positive_int(name, count)


def _check_array(name: str, value: str) -> None:
    if not re.match(r"^\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?$", value):
        raise ConfigError(f"Invalid {name}={value!r}: expected sbatch --array indices such as 0-3, 0,2,5 or 0-7%2.")


# Checks for parameters that several templates share; an empty value means
# "not set" and is checked only when the parameter is required.
VALUE_CHECKS = {
    "nodes": _check_positive_int,
    "ntasks_per_node": _check_positive_int,
    "gpus_per_node": _check_positive_int,
    "cpus_per_task": _check_positive_int,
    "time": _check_time,
    "partition": _check_name,
    "account": _check_name,
    "job_name": _check_name,
    "node_counts": _check_node_counts,
    "array": _check_array,
}


def template_dirs() -> list[Path]:
    """Return the folders searched for templates named without a path.

    ``$HPCDL_SLURM_TEMPLATES`` comes first, then ``slurm/`` in the current
    directory, then ``slurm/`` of the source tree hpcdl was installed from.
    """
    dirs = []
    if os.environ.get("HPCDL_SLURM_TEMPLATES"):
        dirs.append(Path(os.environ["HPCDL_SLURM_TEMPLATES"]))
    dirs.append(Path.cwd() / "slurm")
    # NOTE: a wheel install has no source tree; such users pass a path or set HPCDL_SLURM_TEMPLATES.
    dirs.append(Path(__file__).resolve().parent.parent / "slurm")
    return dirs


def find_template(name: str) -> Path:
    """Return the template file named ``name``: a path, or a file in ``slurm/`` with or without ``.sbatch``.

    Raises:
        ConfigError: no such template.
    """
    path = Path(name)
    if path.is_file():
        return path
    searched = template_dirs()
    for folder in searched:
        for candidate in (folder / name, folder / f"{name}{TEMPLATE_SUFFIX}"):
            if candidate.is_file():
                return candidate
    available = sorted({p.stem for folder in searched if folder.is_dir() for p in folder.glob(f"*{TEMPLATE_SUFFIX}")})
    raise ConfigError(f"Slurm template {name!r} not found. Pass a path or one of: "
                      f"{', '.join(available) or '(no templates found)'}; searched {', '.join(map(str, searched))}.")


def parse_params(text: str) -> dict[str, TemplateParam]:
    """Return the parameters a template declares in its ``## param`` lines, in order."""
    params: dict[str, TemplateParam] = {}
    for line in text.splitlines():
        if not line.startswith("## param"):
            continue
        match = _DECLARATION.match(line.rstrip())
        if match is None:
            raise ConfigError(f"Malformed template line {line!r}: expected '## param NAME[=DEFAULT] | help'.")
        name, default, help_text = match.groups()
        params[name] = TemplateParam(name, None if default is None else default.strip(), (help_text or "").strip())
    return params


def _automatic_default(value: str) -> str:
    if value == "@venv":
        return sys.prefix
    if value == "@cwd":
        return str(Path.cwd())
    return value


def resolve_values(params: dict[str, TemplateParam], overrides: dict[str, str], template: str) -> dict[str, str]:
    """Merge ``overrides`` into the declared defaults and check every value.

    Raises:
        ConfigError: an unknown or missing parameter, or an invalid value.
    """
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ConfigError(f"Unknown parameter {', '.join(unknown)} for template {template!r}; "
                          f"it takes: {', '.join(params)}.")
    values = {}
    for name, param in params.items():
        value = overrides.get(name, param.default)
        if value is None:
            raise ConfigError(f"Missing value for {name!r} in template {template!r} ({param.help}). "
                              f"Give it with --set {name}=VALUE.")
        value = _automatic_default(str(value))
        if "\n" in value or "\r" in value or "\0" in value:
            raise ConfigError(f"Invalid {name}={value!r}: values must fit on one line.")
        values[name] = value

    # "@node_counts" makes a job array with one element per node count.
    for name, value in values.items():
        if value == "@node_counts":
            if "node_counts" not in values:
                raise ConfigError(f"Template {template!r} uses @node_counts for {name!r} but declares no node_counts.")
            _check_node_counts("node_counts", values["node_counts"])
            values[name] = f"0-{len(values['node_counts'].split()) - 1}"

    for name, value in values.items():
        check = VALUE_CHECKS.get(name)
        if check is not None and (value or params[name].default is None):
            check(name, value)
    return values


def fill(text: str, values: dict[str, str]) -> str:
    """Substitute ``values`` into the template text, dropping ``##`` lines and empty ``#SBATCH`` lines."""
    lines = []
    for line in text.splitlines():
        if line.startswith("##"):
            continue
        names = PLACEHOLDER.findall(line)
        if line.startswith("#SBATCH") and names and all(values[name] == "" for name in names):
            continue
        lines.append(PLACEHOLDER.sub(lambda match: values[match.group(1)], line))
    return "\n".join(lines) + "\n"


def render_template(template: str, overrides: dict[str, str]) -> str:
    """Return the job script of ``template`` filled with ``overrides`` and the declared defaults.

    Raises:
        ConfigError: the template is not found, a value is missing or invalid, or
            the template uses a placeholder it does not declare.
    """
    path = find_template(template)
    text = path.read_text()
    params = parse_params(text)
    undeclared = sorted(set(PLACEHOLDER.findall(text)) - set(params))
    if undeclared:
        raise ConfigError(f"Template {str(path)!r} uses undeclared placeholders {', '.join(undeclared)}; "
                          "declare each in a '## param' line.")
    values = resolve_values(params, overrides, str(path))
    if "node_counts" in values and "nodes" in values:
        largest = max(int(count) for count in values["node_counts"].split())
        if largest > int(values["nodes"]):
            raise ConfigError(f"Invalid node_counts={values['node_counts']!r}: {largest} nodes exceed the "
                              f"allocation of nodes={values['nodes']}. Raise --nodes to {largest}.")
    return fill(text, values)


def parse_assignments(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Turn ``KEY=VALUE`` strings into a dict; dashes in keys become underscores.

    Raises:
        ConfigError: an item has no ``=``.
    """
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Invalid --set {item!r}: expected KEY=VALUE.")
        values[key.strip().replace("-", "_")] = value
    return values


def submit(script: str, sbatch_args: list[str] | tuple[str, ...] = (), script_path: Path | None = None) -> str:
    """Submit a job script with ``sbatch --parsable`` and return the job id. Does not wait for the job.

    The script goes to sbatch as ``script_path`` when given, else on its standard input.

    Raises:
        ConfigError: sbatch is not on PATH.
        RuntimeError: sbatch rejected the job; the message contains its output.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("sbatch not found on PATH. Run 'hpcdl slurm submit' on a Slurm login node, "
                          "or use 'hpcdl slurm render -o FILE' and copy the script there.")
    command = [sbatch, "--parsable", *sbatch_args]
    if script_path is not None:
        command.append(str(script_path))
        result = subprocess.run(command, capture_output=True, text=True)
    else:
        result = subprocess.run(command, input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed with exit status {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    return result.stdout.strip().split(";")[0]
