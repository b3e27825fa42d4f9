"""The `tracetune` command: one sub-command per process, plus stats, models and the supervisor.

One module per command group (`store`, `tuner`, `drift`, `alerts`, `dead_letters`, `models`), the long-running
processes in `processes`, the one-shot queries in `queries`, and what they share (one-line user
errors, settings, the store client) in `common`. A new group is a module here defining a
`@click.group()`, registered in `COMMANDS` below; `main` is the console script (`tracetune.cli:main`).
"""

from __future__ import annotations

import logging

import click

from tracetune.cli import alerts, dead_letters, drift, models, processes, queries, store, tuner
from tracetune.cli.common import UserError

__all__ = ["cli", "main", "UserError"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="TOML settings file (default: ./tracetune.toml if present).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """tracetune: observe AI task pipelines, and tune them against their SLOs."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx.obj = {"config": config}


COMMANDS: tuple[click.Command, ...] = (
    store.store, processes.collector, tuner.tuner, processes.executor, processes.standins, processes.load,
    processes.analyzer_cmd, processes.dashboard, processes.up, processes.demo,
    queries.stats, queries.cost, queries.whatif, drift.drift, queries.slo, queries.errors, queries.report,
    alerts.alerts, dead_letters.dead_letters_group, models.models,
)
for command in COMMANDS:
    cli.add_command(command)


def main() -> None:
    cli(prog_name="tracetune")
