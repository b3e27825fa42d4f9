"""`tracetune models build`: the executor's demo ONNX models."""

from __future__ import annotations

import json

import click

from tracetune.cli.common import load_settings


@click.group()
def models() -> None:
    """Build the executor's ONNX models."""


@models.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the models exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the full build report as JSON.")
@click.pass_context
def models_build(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Train and export the demo models into .tracetune/models (reused when present)."""
    from tracetune.demo.models import build_models
    from tracetune.terminal import models_summary

    report = build_models(load_settings(ctx).models_dir, force=force, progress=True)  # on stderr
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(models_summary(report)))
