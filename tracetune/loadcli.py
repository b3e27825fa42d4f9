"""`tracetune load`: the load generator with a progress bar, Ctrl-C to stop early."""

from __future__ import annotations

import asyncio
import signal
import sys

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tracetune import store
from tracetune.base.settings import Settings
from tracetune.demo.load import SOURCES, LoadPlan, ground_truth_writer, run_load

TRIAGE = "ticket_triage"  # demo.triage.NAME (importing it loads the executor's runtime: a second at start)


def run_load_command(settings: Settings, plan: LoadPlan, pipeline: str, progress: bool = True) -> dict:
    client = store.connect(settings, wait=30)
    record = ground_truth_writer(client)
    show = progress and sys.stdout.isatty()

    async def main() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        columns = [TextColumn("[bold]load[/bold] {task.description}"), BarColumn(), TimeElapsedColumn(),
                   TextColumn("sent {task.fields[sent]} ok {task.fields[ok]} failed {task.fields[failed]}")]
        with Progress(*columns, disable=not show, transient=False) as bar:
            task = bar.add_task(f"{plan.pattern} {plan.rate:g}/s", total=plan.duration, sent=0, ok=0, failed=0)

            def update(report) -> None:
                bar.update(task, completed=min(plan.duration or 0, loop.time() - started), sent=report.sent,
                           ok=report.ok, failed=report.failed + report.rejected + report.overloaded)

            started = loop.time()
            report = await run_load(plan, settings.executor_url, pipeline, record=record,
                                    progress=update if show else None, stop=stop, token=settings.secret("executor"))
        summary = report.summary()
        if pipeline != TRIAGE and pipeline not in SOURCES:  # its labels are another pipeline's: nothing to score
            summary["accuracy"] = None
            summary["accuracy_note"] = f"no ground truth for {pipeline} (the load's labels are {TRIAGE} categories)"
        return summary

    return asyncio.run(main())
