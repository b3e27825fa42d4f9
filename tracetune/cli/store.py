"""`tracetune store`: run the embedded store; `store migrate` and `store status` manage the schema."""

from __future__ import annotations

import json
import sys

import click

from tracetune.base.settings import Settings, SettingsError
from tracetune.cli.common import UserError, load_settings


@click.group(invoke_without_command=True)
@click.pass_context
def store(ctx: click.Context) -> None:
    """Run the embedded ClickHouse (chDB) on the ClickHouse HTTP interface (default 127.0.0.1:8123).

    `tracetune store migrate` and `tracetune store status` manage the schema of whichever ClickHouse the
    settings name (the embedded store, a server, or a cluster).
    """
    if ctx.invoked_subcommand is not None:
        return
    s = load_settings(ctx, discover=False)  # the store of a home, never a running stack's
    if not s.embedded:
        raise UserError("TRACETUNE_CLICKHOUSE_URL is set: the embedded store is not used; unset it "
                                   "to run the embedded store")
    if s.clickhouse_cluster:
        raise UserError(f"TRACETUNE_CLICKHOUSE_CLUSTER={s.clickhouse_cluster} is set: a cluster is reached through "
                        "TRACETUNE_CLICKHOUSE_URL, not the embedded store; unset one of them")
    from tracetune import store as store_mod
    store_mod.serve(s)


def _schema_client(s: Settings, create_database: bool):
    """A client on the settings' database for the schema commands (no migration on connect)."""
    from tracetune import store as store_mod

    where = s.store_url if s.embedded else s.clickhouse_url
    try:
        if create_database:
            store_mod.ensure_database(s)
        return store_mod.connect(s, ensure_schema=False)
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to reach ClickHouse gets the same one-line answer
        if not create_database and "UNKNOWN_DATABASE" in str(exc):
            return None  # nothing applied yet: every migration is pending
        raise UserError(f"cannot reach ClickHouse at {where}: {str(exc).splitlines()[0]} "
                        "(is `tracetune store` or `tracetune up` running?)") from None


@store.command("migrate")
@click.pass_context
def store_migrate(ctx: click.Context) -> None:
    """Apply the schema migrations the database lacks, in order, and print each one applied."""
    from tracetune import store as store_mod
    from tracetune.store.migrations import who

    s = load_settings(ctx)
    client = _schema_client(s, create_database=True)
    try:
        pending = [st for st in store_mod.migration_status(client) if st.state == "pending"]
        done: list[object] = []
        show = len(pending) > 1 and sys.stderr.isatty()  # a bar on a terminal; logs get the lines below
        with click.progressbar(length=len(pending), label="migrating", file=sys.stderr, show_pos=True,
                               hidden=not show) as bar:
            result = store_mod.migrate(client, cluster=s.clickhouse_cluster,
                                       applied_by=f"{who()} (tracetune store migrate)",
                                       progress=lambda m: (done.append(m), bar.update(1)))
    except (store_mod.MigrationError, store_mod.ClusterFormError) as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a statement the server refused: say which, in one line
        failed = f" {pending[len(done)].version:03d} {pending[len(done)].name}" if len(done) < len(pending) else ""
        raise UserError(f"migration{failed} failed ({len(done)} applied before it, and recorded): "
                        f"{str(exc).splitlines()[0]}") from None
    for migration in result.applied:
        click.echo(f"applied {migration.label}")
    for state in result.changed:
        click.echo(f"warning: {state.version:03d} {state.name} has changed since it was applied "
                   f"({state.applied_at:%Y-%m-%d %H:%M} UTC); a changed file is not applied again: add a new "
                   "migration instead", err=True)
    where = f"cluster {s.clickhouse_cluster}, " if s.clickhouse_cluster else ""
    done = f"{len(result.applied)} applied" if result.applied else "nothing to apply"
    click.echo(f"{done}; {where}database {s.database} is at version {result.version:03d}")


@store.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@click.pass_context
def store_status(ctx: click.Context, as_json: bool) -> None:
    """Each migration and its state in the database: applied, pending, changed or unknown."""
    from tracetune import store as store_mod

    s = load_settings(ctx)
    client = _schema_client(s, create_database=False)
    try:
        states = store_mod.migration_status(client)
    except store_mod.MigrationError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the same one-line answer as for any unreachable store
        raise UserError(f"cannot read the schema state: {str(exc).splitlines()[0]}") from None
    if as_json:
        click.echo(json.dumps([st.as_dict() for st in states], indent=2))
        return
    rows = [(f"{st.version:03d}", st.name, st.state,
             f"{st.applied_at:%Y-%m-%d %H:%M:%S}" if st.applied_at else "", st.applied_by) for st in states]
    header = ("version", "name", "state", "applied at (UTC)", "applied by")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
