"""The ``hpcdl slurm`` commands: render a template in ``slurm/`` and submit it."""

from __future__ import annotations

from pathlib import Path

import click

from hpcdl.errors import ConfigError

# Options that fill the placeholder of the same name (dashes become underscores).
_TEMPLATE_OPTIONS = [
    click.option("--nodes", help="Nodes to allocate (placeholder 'nodes')."),
    click.option("--ntasks-per-node", help="MPI ranks per node (placeholder 'ntasks_per_node')."),
    click.option("--gpus-per-node", help="GPUs per node; one rank per GPU (placeholder 'gpus_per_node')."),
    click.option("--partition", help="Slurm partition (placeholder 'partition')."),
    click.option("--time", help="Time limit, e.g. 30 (minutes), 02:00:00 or 1-00:00:00 (placeholder 'time')."),
    click.option("--account", help="Account to charge (placeholder 'account')."),
    click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                 help="Set any other placeholder of the template; repeat for several."),
]


def _template_options(func):
    for option in reversed(_TEMPLATE_OPTIONS):
        func = option(func)
    return func


def _render(template: str, assignments: tuple[str, ...], options: dict[str, str | None]) -> str:
    from hpcdl.slurm import parse_assignments, render_template

    values = parse_assignments(assignments)
    values.update({name: value for name, value in options.items() if value is not None})
    return render_template(template, values)


class _UsageFailure(click.ClickException):
    exit_code = 2


@click.group()
def slurm() -> None:
    """Fill the sbatch templates in slurm/ and submit them.

    \b
    Examples:
      hpcdl slurm render cpu-single-node --ntasks-per-node 4 -o job.sbatch
      hpcdl slurm submit cpu-multi-node --nodes 4 --partition compute --time 01:00:00
    """


@slurm.command()
@click.argument("template")
@_template_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the script here instead of stdout.")
def render(template: str, assignments: tuple[str, ...], output: str | None, **options: str | None) -> None:
    """Print the job script of TEMPLATE (a file in slurm/, with or without .sbatch, or a path)."""
    try:
        script = _render(template, assignments, options)
    except ConfigError as exc:
        raise _UsageFailure(str(exc)) from None
    if output is None:
        click.echo(script, nl=False)
        return
    Path(output).write_text(script)
    Path(output).chmod(0o755)


@slurm.command()
@click.argument("template")
@_template_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also keep the submitted script in this file.")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
              help="Pass ARG to sbatch before the script, e.g. --sbatch-arg=--dependency=afterok:123.")
def submit(template: str, assignments: tuple[str, ...], output: str | None, sbatch_args: tuple[str, ...],
           **options: str | None) -> None:
    """Render TEMPLATE, submit it with sbatch and print the job id. Does not wait for the job."""
    from hpcdl.slurm import submit as sbatch_submit

    try:
        script = _render(template, assignments, options)
        script_path = None
        if output is not None:
            script_path = Path(output)
            script_path.write_text(script)
            script_path.chmod(0o755)
        job_id = sbatch_submit(script, sbatch_args, script_path)
    except ConfigError as exc:
        raise _UsageFailure(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(job_id)
