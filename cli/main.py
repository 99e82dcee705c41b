"""The ``pem`` command: a thin layer over :class:`registry.Registry`.

Each command parses its options, calls one API method and prints the result (a table, or
the API's pydantic models as JSON with ``--json``). Errors the registry raises on purpose
(:class:`registry.errors.PemError`) print as one line, without a traceback.
Nothing here imports torch: commands that touch tensors import it inside the API call.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from typing import Any, Callable, Iterable, NoReturn

import click

from registry.errors import PemError, error_document

HOME_HELP = "Registry home folder (default: $PEM_HOME, else ~/.pem)."


JSON_ERRORS = "pem.json_errors"  # ctx.meta key: the command was given --json
JSON_ASKED = "pem.json_asked"  # ctx.meta key: --json is somewhere in the command line


class PemCommand(click.Command):
    """A command that notes when it was given --json, so that its errors print as JSON."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Noted before parsing: a usage error (a bad option) is raised before any callback runs.
        options = args[: args.index("--")] if "--" in args else args
        if "--json" in options and any(p.name == "as_json" for p in self.params):
            ctx.meta[JSON_ERRORS] = True
        return super().parse_args(ctx, self.arrange_args(ctx, args))

    def arrange_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """The arguments as click should parse them (subclasses reorder them)."""
        return args


# What an option name looks like: an argument that starts with '-' but does not (`-0.5*team/x`,
# `-team/x`) is an expression, never an option.
_OPTION_NAME = re.compile(r"--?[A-Za-z][A-Za-z0-9_-]*(=.*)?", re.DOTALL)


class ExpressionCommand(PemCommand):
    """A command whose EXPRESSION may begin with a minus, as negation does (`pem check "-team/x"`).

    Such an argument is moved behind ``--``, where click reads it as the expression. Options,
    their values, and arguments that look like option names (an unknown ``--nope`` stays an
    error) are parsed as usual."""

    def arrange_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {
            name for p in self.get_params(ctx) if isinstance(p, click.Option) and not p.is_flag and not p.count
            for name in p.opts
        }
        options, positional, moved = [], [], False
        rest = iter(args)
        for arg in rest:
            if arg == "--":
                positional.extend(rest)
            elif arg in takes_value:  # and its value, even one that starts with '-'
                value = next(rest, None)
                if value is None:
                    raise click.BadOptionUsage(arg, f"Option '{arg}' requires an argument.", ctx)
                options += [arg, value]
            elif arg.startswith("-") and len(arg) > 1 and not _OPTION_NAME.fullmatch(arg):
                positional.append(arg)
                moved = True
            elif arg.startswith("-"):
                options.append(arg)
            else:
                positional.append(arg)
        return [*options, "--", *positional] if moved else args


class PemGroup(click.Group):
    """Turns PemError into ``error: <message>`` on stderr and the error's exit code; with
    --json, errors (usage errors too) print as a JSON object on stdout instead."""

    command_class = PemCommand
    group_class = type  # subgroups (`pem token ...`) are PemGroups too, so they report errors alike

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A mistyped command (`pem shwo x --json`) is refused by the group, before any command
        # parses its --json: the flag anywhere before `--` asks for a JSON error then.
        if "--json" in (args[: args.index("--")] if "--" in args else args):
            ctx.meta[JSON_ASKED] = True
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # a bad option of the group itself (`pem --json list`)
            self._usage_error(ctx, exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PemError as exc:
            _fail(ctx, type(exc).__name__, str(exc), exc.exit_code)
        except click.UsageError as exc:
            self._usage_error(ctx, exc)

    @staticmethod
    def _usage_error(ctx: click.Context, exc: click.UsageError) -> NoReturn:
        """As JSON when the command was given --json, or when a group refused the command line
        and --json was in it; else click prints the usage and the error (a command without
        --json, given it, stays a plain usage error)."""
        by_group = exc.ctx is None or isinstance(exc.ctx.command, click.Group)
        if ctx.meta.get(JSON_ERRORS) or (by_group and ctx.meta.get(JSON_ASKED)):
            ctx.meta[JSON_ERRORS] = True
            _fail(ctx, "UsageError", exc.format_message(), exc.exit_code)
        raise exc


def _fail(ctx: click.Context, type_name: str, message: str, exit_code: int) -> NoReturn:
    if ctx.meta.get(JSON_ERRORS):
        click.echo(json.dumps(error_document(type_name, message)))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


def _group_home(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--home after the command wins; else the one before it (`pem --home DIR list`)."""
    return value if value is not None else ctx.find_root().params.get("home")


def home_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every command takes --home (it also reads PEM_HOME)."""
    return click.option("--home", type=click.Path(file_okay=False), default=None, help=HOME_HELP,
                        callback=_group_home)(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README).")(fn)


def complete_reference(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of module names, then of versions and aliases after '@' (enabled as
    the README says, through click's ``_PEM_COMPLETE``). Reads the catalog only; says nothing
    when it cannot (no registry yet)."""
    from click.shell_completion import CompletionItem

    from registry import Registry

    try:
        with Registry.open(ctx.params.get("home")) as registry:
            return [CompletionItem(ref) for ref in registry.complete_reference(incomplete)]
    except Exception:  # a completion never prints an error into the user's command line
        return []


def with_registry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Open the registry named by --home and pass it as the first argument."""

    @home_option
    @functools.wraps(fn)
    def wrapper(home: str | None, **kwargs: Any) -> Any:
        from cli.server_commands import open_registry

        registry = open_registry(home)  # local, or the server of --registry / PEM_REGISTRY_URL
        try:
            return fn(registry, **kwargs)
        finally:
            registry.close()

    return wrapper


def echo_json(value: Any) -> None:
    """Print a pydantic model, or a list of them, as JSON."""
    if isinstance(value, list):  # each item through pydantic's serializer, like a single model
        click.echo(json.dumps([json.loads(item.model_dump_json()) for item in value], indent=2))
    else:
        click.echo(value.model_dump_json(indent=2))


def _console():
    from rich.console import Console

    # Wide when piped, so that tables are not folded into unreadable columns.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@click.group(cls=PemGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), default=None, help=HOME_HELP + " Also after the command.")
@click.version_option(package_name="pem-registry", prog_name="pem")
@click.option("--registry", "registry_url", metavar="URL",
              help="A registry server (pem serve) to work against (default: $PEM_REGISTRY_URL, else the local registry).")
@click.pass_context
def pem(ctx: click.Context, home: str | None, registry_url: str | None) -> None:
    """pem-registry: keep, compose and publish parameter-efficient modules (PEFT adapters)."""
    from cli.server_commands import refuse_host_side

    refuse_host_side(ctx.invoked_subcommand, registry_url)


# --- database ---------------------------------------------------------------------------------


@pem.command()
@home_option
def init(home: str | None) -> None:
    """Create the registry (database and blob store), or upgrade its schema."""
    from registry import Registry

    registry = Registry.init(home)
    click.echo(f"registry ready: {registry.settings.home} (database {registry.engine.url.render_as_string()})")
    registry.close()


@pem.group()
def db() -> None:
    """Database schema: current revision and upgrades."""


@db.command("upgrade")
@home_option
def db_upgrade(home: str | None) -> None:
    """Upgrade the database schema to this version of pem (same as `pem init`)."""
    from registry import Registry

    Registry.init(home).close()
    click.echo("database schema is up to date")


@db.command("current")
@home_option
def db_current(home: str | None) -> None:
    """Print the database's schema revision and the one this pem expects."""
    from registry.config import Settings
    from registry.db.engine import SCHEMA_HEAD, current_revision, make_engine

    revision = current_revision(make_engine(Settings.resolve(home).database_url))
    click.echo(f"current: {revision or 'none (run `pem init`)'}\nexpected: {SCHEMA_HEAD}")


# --- catalog ----------------------------------------------------------------------------------


def _tags_from_options(values: Iterable[str]) -> dict[str, str]:
    from registry.api import parse_tag

    return dict(parse_tag(v) for v in values)


@pem.command()
@click.argument("path", type=click.Path())
@click.option("--name", required=True, help="NS/NAME to register it as.")
@click.option("--task", help="The task it was trained for (free text, e.g. sentiment).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A tag; repeatable.")
@click.option("--base-model", help="Base model id (overrides adapter_config.json).")
@click.option("--base-revision", help="Base model revision (overrides adapter_config.json).")
@click.option("--description", help="A sentence on what it is.")
@click.option("--allow-nonfinite", is_flag=True, help="Register even if tensors hold NaN or Inf.")
@json_option
@with_registry
def add(registry: Any, path: str, name: str, tags: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Register the PEFT adapter folder PATH."""
    info = registry.add(path, name, tags=_tags_from_options(tags), **options)
    if as_json:
        echo_json(info)
    elif info.created:
        click.echo(f"registered {info.ref}  sha256:{info.digest[:12]}  {info.peft_type}  {human_size(info.size_bytes)}")
    else:
        click.echo(f"already registered as {info.ref} (same tensors and config)")


@pem.command("list")
@click.option("--base-model", help="Only modules for this base model id.")
@click.option("--peft-type", help="LORA, IA3, ... (case-insensitive).")
@click.option("--task", help="Only modules for this task.")
@click.option("--rank", type=int, help="Only LoRA modules of this rank.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only modules with this tag; repeatable.")
@click.option("--kind", type=click.Choice(["trained", "derived", "ported", "pulled"]), help="Only this kind.")
@click.option("--derived-from", help="Only modules derived (transitively) from this reference.",
              shell_complete=complete_reference)
@click.option("--latest", is_flag=True, help="Only the latest version of each name.")
@click.option("--search", help="Only modules whose name, task, description or a tag (KEY=VALUE) contains TEXT (any case).",
              metavar="TEXT")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (in name order).")
@json_option
@with_registry
def list_(registry: Any, tags: tuple[str, ...], as_json: bool, **filters: Any) -> None:
    """List registered modules, filtered."""
    modules = registry.list(tags=_tags_from_options(tags), **filters)
    if as_json:
        echo_json(modules)
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("MODULE", "KIND", "TYPE", "BASE MODEL", "TASK", "RANK", "DTYPE", "SIZE", "DIGEST", "ALIASES", "TAGS"):
        table.add_column(column)
    for m in modules:
        table.add_row(
            m.ref, m.kind, m.peft_type, m.base_model, m.task or "", str(m.rank or ""), m.dtype,
            human_size(m.size_bytes), m.digest[:12], " ".join(m.aliases), " ".join(f"{k}={v}" for k, v in m.tags.items()),
        )
    _console().print(table) if modules else click.echo("no modules match")


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@json_option
@with_registry
def show(registry: Any, ref: str, as_json: bool) -> None:
    """Show one module: metadata, layers, provenance."""
    details = registry.get(ref)
    if as_json:
        echo_json(details)
        return
    rows = [
        ("module", details.ref),
        ("kind", details.kind),
        ("digest", f"sha256:{details.digest}"),
        ("peft type", details.peft_type + ("" if details.composable else f" (not composable: {', '.join(details.unsupported)})")),
        ("base model", details.base_model + (f" @ {details.base_revision}" if details.base_revision else "")),
        ("task", details.task or "-"),
        ("rank / alpha", _rank_alpha(details)),
        ("target modules", ", ".join(details.target_modules) or "-"),
        ("layers", str(len(details.layers))),
        ("dtype", details.dtype),
        ("parameters", f"{details.num_parameters:,}"),
        ("size", human_size(details.size_bytes)),
        ("tags", " ".join(f"{k}={v}" for k, v in details.tags.items()) or "-"),
        ("aliases", " ".join(details.aliases) or "-"),
        ("owner", details.owner),
        ("created", details.created_at.isoformat(timespec="seconds")),
    ]
    if details.description:
        rows.append(("description", details.description))
    if details.provenance:
        p = details.provenance
        rows.append(("expression", p.canonical))
        rows.append(("method", p.method + "".join(f" {k}={v}" for k, v in p.parameters.items())))
        if p.results:
            results = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.results.items())
            rows.append(("results", " ".join(results)))
        for item in p.inputs:
            rows.append(("input", f"{item.ref}  b={item.b:g}  a={item.a:g}  sha256:{item.digest[:12]}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _rank_alpha(details: Any) -> str:
    if details.rank is None:
        return "-"
    alpha = f" / {details.lora_alpha:g}" if details.lora_alpha is not None else ""
    return f"{details.rank}{alpha}" + (" (rsLoRA)" if details.use_rslora else "")


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace adapter files already in DIRECTORY.")
@with_registry
def export(registry: Any, ref: str, directory: str, force: bool) -> None:
    """Write REF as a PEFT adapter folder DIRECTORY (created if needed; its other files are kept)."""
    target = registry.export(ref, directory, force=force)
    click.echo(f"exported {registry.resolve(ref).ref} to {target}")


@pem.command()
@click.argument("ref", metavar="NS/NAME@VERSION", shell_complete=complete_reference)
@click.option("--dry-run", is_flag=True, help="Only show what would be removed, and the blob it would free.")
@json_option
@with_registry
def rm(registry: Any, ref: str, dry_run: bool, as_json: bool) -> None:
    """Remove one module version (refused while modules derived from it exist, or an alias points at it)."""
    removal = registry.remove(ref, dry_run=dry_run)
    if as_json:
        echo_json(removal)
    elif not dry_run:
        click.echo(f"removed {removal.ref}")
    else:
        records = [f"tags {' '.join(f'{k}={v}' for k, v in removal.tags.items())}"] if removal.tags else []
        records += ["its provenance"] if removal.provenance else []
        records += [f"{removal.hub_links} Hub link{'s' if removal.hub_links != 1 else ''}"] if removal.hub_links else []
        click.echo(f"would remove {removal.ref}" + (f" ({'; '.join(records)})" if records else ""))
        if removal.blob_freed:
            click.echo(f"would free blob sha256:{removal.digest[:12]} ({human_size(removal.bytes_freed)})")
        else:
            click.echo(f"would keep blob sha256:{removal.digest[:12]}: also used by {', '.join(removal.blob_kept_for)}")


# --- composition ------------------------------------------------------------------------------


def composition_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    from registry.methods import DEFAULT_METHOD, METHODS

    options = [
        click.option("--method", default=DEFAULT_METHOD, show_default=True, type=click.Choice(list(METHODS)),
                     help="module: the paper's arithmetic on parameters; exact: concatenated ranks; svd: exact, "
                          "truncated; ties, dare_linear, dare_ties, magnitude_prune: PEFT's merges, truncated."),
        click.option("--rank", type=int, help="Output rank (truncating methods; default: the largest input rank)."),
        click.option("--density", type=float,
                     help="Fraction of entries each input keeps, in (0, 1] (ties, dare, magnitude_prune)."),
        click.option("--seed", type=int, help="Seed of DARE's random drop mask (dare_linear, dare_ties; required)."),
        click.option("--majority-sign", type=click.Choice(["total", "frequency"]),
                     help="TIES's sign election (ties, dare_ties; default total)."),
        click.option("--space", type=click.Choice(["full", "core"]),
                     help="Merge the dense effects (full, default, as PEFT) or the small cores of the factors (core)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
                     help="Output dtype (default: the inputs' common dtype)."),
        click.option("--union", is_flag=True, help="Allow layers adapted by only some inputs (missing = no effect)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@pem.command(cls=ExpressionCommand)
@click.argument("expression")
@composition_options
@click.option("--deviation", is_flag=True,
              help="Read the tensors and measure how far the method is from the exact sum (LoRA).")
@json_option
@with_registry
def check(registry: Any, expression: str, as_json: bool, **options: Any) -> None:
    """Check EXPRESSION without computing it: terms, output, and every incompatibility."""
    report = registry.check(expression, **options)
    if as_json:
        echo_json(report)
    else:
        _print_report(report)
    if not report.composable:
        sys.exit(1)


def _print_report(report: Any) -> None:
    click.echo(f"expression  {report.canonical}")
    click.echo(f"method      {report.method}" + "".join(f" {k}={v}" for k, v in report.parameters.items() if v not in (None, False)))
    for term in report.terms:
        click.echo(f"  {term.b:+g}  {term.ref}  (a={term.a:g}, {term.peft_type}, sha256:{term.digest[:12]})")
    if report.output:
        o = report.output
        rank = f", rank {o.rank}" if o.rank else ""
        click.echo(f"output      {o.peft_type}{rank}, {o.layers} layers, {o.dtype}, {o.num_parameters:,} parameters, {human_size(o.size_bytes)}")
        if o.estimated_seconds is not None and o.estimated_peak_bytes is not None:
            click.echo(f"estimate    about {o.estimated_seconds:g} s and {human_size(o.estimated_peak_bytes)} peak memory "
                       "to compose")
    for note in report.notes:
        click.echo(f"note        {note}")
    if report.deviation:
        click.echo(f"deviation   {report.deviation.overall:.4g} relative Frobenius error of dW vs the exact sum (overall)")
        for layer, value in report.deviation.per_layer.items():
            click.echo(f"            {value:.4g}  {layer}")
    if report.composable:
        click.echo("composable")
    else:
        click.echo(f"not composable ({len(report.violations)} problem{'s' if len(report.violations) != 1 else ''}):")
        for violation in report.violations:
            click.echo(f"  - {violation}")


@pem.command(cls=ExpressionCommand)
@click.argument("expression")
@click.option("--name", required=True, help="NS/NAME of the new module.")
@composition_options
@click.option("--description", help="A sentence on what it is for.")
@click.option("--new-version", is_flag=True, help="Add a version when NAME already holds another derivation.")
@json_option
@with_registry
def compose(registry: Any, expression: str, name: str, as_json: bool, **options: Any) -> None:
    """Evaluate EXPRESSION into a new registered module NAME, with its provenance."""
    with _progress("composing") as progress:
        info = registry.compose(expression, name, progress=progress, **options)
    if as_json:
        echo_json(info)
    elif info.created:
        click.echo(f"composed {info.ref}  sha256:{info.digest[:12]}  {info.peft_type} rank {info.rank or '-'}  {human_size(info.size_bytes)}")
    else:
        click.echo(f"{info.ref} already holds this derivation (same inputs, coefficients and method)")


class _progress:
    """A rich progress bar on a terminal; nothing when output is piped."""

    def __init__(self, label: str):
        self.label = label
        self.bar: Any = None

    def __enter__(self) -> Callable[[int, int], None] | None:
        if not sys.stderr.isatty():
            return None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=None)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- provenance -------------------------------------------------------------------------------


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (nodes and edges).")
@click.option("--format", "fmt", type=click.Choice(["tree", "dot", "mermaid"]), default="tree", show_default=True)
@with_registry
def lineage(registry: Any, ref: str, as_json: bool, fmt: str) -> None:
    """What REF is made of: its ancestors down to modules that were not derived."""
    from registry import render

    graph = registry.lineage(ref)
    if as_json:
        echo_json(graph)
    else:
        click.echo({"tree": render.tree, "dot": render.dot, "mermaid": render.mermaid}[fmt](graph))


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@json_option
@with_registry
def descendants(registry: Any, ref: str, as_json: bool) -> None:
    """What was built from REF, transitively, with the path to each."""
    found = registry.descendants(ref)
    if as_json:
        echo_json(found)
    elif not found:
        click.echo(f"nothing was derived from {registry.resolve(ref).ref}")
    else:
        for item in found:
            published = f"  published: {', '.join(item.published)}" if item.published else ""
            click.echo(f"{item.ref}  ({item.kind}, depth {item.depth})  via {' > '.join(item.path)}{published}")


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@json_option
@with_registry
def contents(registry: Any, ref: str, as_json: bool) -> None:
    """The effective weight of each non-derived module inside REF."""
    result = registry.contents(ref)
    if as_json:
        echo_json(result)
        return
    approximate = "" if result.root_linear else " (non-linear method: it approximates)"
    click.echo(f"{result.root}{approximate} contains:")

    def show(terms: list[Any], indent: str) -> None:
        for term in terms:
            opaque = "  (opaque: non-linear; its contents below)" if term.opaque else ""
            click.echo(f"{indent}{term.b:+.6g}  {term.ref}  (a={term.a:.6g}, {term.kind}){opaque}")
            if term.contents:
                show(term.contents, indent + "    ")

    show(result.terms, "  ")


@pem.command()
@click.argument("ref", required=False, shell_complete=complete_reference)
@click.option("--all", "check_all", is_flag=True, help="Verify every module.")
@json_option
@with_registry
def verify(registry: Any, ref: str | None, check_all: bool, as_json: bool) -> None:
    """Check blobs against their digests and re-run derivations; exits 1 on any failure."""
    if (ref is None) == (not check_all):
        raise click.UsageError("give a REF or --all")
    with _progress("verifying") as progress:
        report = registry.verify(None if check_all else ref, progress=progress)
    if as_json:
        echo_json(report)
    else:
        for note in report.notes:
            click.echo(f"note: {note}")
        for failure in report.failures:
            click.echo(f"FAILED {failure.ref}: {failure.problem}")
        click.echo(f"{report.checked} checked, {report.rederived} re-derived, {len(report.failures)} failed")
    if not report.ok:
        sys.exit(1)


# --- base models and porting -------------------------------------------------------------------


@pem.group()
def base() -> None:
    """Base (host) models: their structure, for porting."""


@base.command("add")
@click.argument("base_model", metavar="ID[@REV]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="A local config.json (else from the Hub).")
@click.option("--endpoint", help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co).")
@json_option
@with_registry
def base_add(registry: Any, base_model: str, config_path: str | None, endpoint: str | None, as_json: bool) -> None:
    """Record a base model from its config.json (no weights)."""
    info = registry.add_base(base_model, config_path=config_path, endpoint=endpoint)
    if as_json:
        echo_json(info)
    else:
        structure = (f"{info.adaptable_modules} adaptable modules" if info.structure_known
                     else f"structure unknown: {info.structure_unknown_reason}")
        click.echo(f"recorded {info.model_id}{'@' + info.revision if info.revision else ''}: "
                   f"{info.architecture or 'architecture unknown (config.json names none)'}, {structure}")


@base.command("list")
@json_option
@with_registry
def base_list(registry: Any, as_json: bool) -> None:
    """List recorded base models."""
    bases = registry.list_bases()
    if as_json:
        echo_json(bases)
        return
    for b in bases:
        dims = " ".join(f"{k}={v}" for k, v in b.dimensions.items())
        click.echo(f"{b.model_id}{'@' + b.revision if b.revision else ''}  {b.architecture}  {dims}  adapters={b.adapters}")
    if not bases:
        click.echo("no base models recorded (pem base add ID --config config.json)")


@base.command("show")
@click.argument("base_model", metavar="ID[@REV]")
@json_option
@with_registry
def base_show(registry: Any, base_model: str, as_json: bool) -> None:
    """Show a recorded base model."""
    info = registry.get_base(base_model)
    if as_json:
        echo_json(info)
        return
    rows = [
        ("base model", info.model_id + (f"@{info.revision}" if info.revision else "")),
        ("architecture", info.architecture or "unknown (config.json names no architectures)"),
        ("model type", info.model_type or "unknown (config.json has no model_type)"),
        *((key, "unknown" if value is None else str(value)) for key, value in info.dimensions.items()),
        ("structure", f"{info.adaptable_modules} adaptable modules" if info.structure_known else "unknown"),
        ("adapters", str(info.adapters)),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@click.option("--to", "to", required=True, metavar="BASE_ID[@REV]", help="The host to port to (see `pem base add`).")
@click.option("--name", help="NS/NAME of the ported module (required unless --dry-run).")
@click.option("--dry-run", is_flag=True, help="Only report the compatibility level and its evidence.")
@json_option
@with_registry
def port(registry: Any, ref: str, to: str, name: str | None, dry_run: bool, as_json: bool) -> None:
    """Port REF to another host model, as a new recorded module sharing its tensors."""
    if dry_run:
        report = registry.check_port(ref, to)
        if as_json:
            echo_json(report)
        else:
            click.echo(f"{report.module}: {report.from_base} -> {report.to_base}: {report.level}")
            for line in report.evidence + report.missing + report.mismatched:
                click.echo(f"  {line}")
        if report.level != "compatible":
            sys.exit(1)
        return
    if not name:
        raise click.UsageError("--name is required (or pass --dry-run)")
    info = registry.port(ref, to, name)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"ported {ref} to {to} as {info.ref}")


# --- the Hub ----------------------------------------------------------------------------------


def endpoint_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--endpoint", help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co).")(fn)


@pem.command()
@click.argument("repo", metavar="REPO_ID[@REVISION]")
@click.option("--name", help="NS/NAME to register it as (default: the repo id).")
@click.option("--task", help="The task it was trained for.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A tag; repeatable.")
@endpoint_option
@json_option
@with_registry
def pull(registry: Any, repo: str, tags: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Register an adapter from the Hub, pinned to the commit it resolves to."""
    info = registry.pull(repo, tags=_tags_from_options(tags), **options)
    if as_json:
        echo_json(info)
    elif info.created:
        click.echo(f"pulled {repo} as {info.ref}  sha256:{info.digest[:12]}")
    else:
        click.echo(f"{repo} is already registered as {info.ref}")


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@click.argument("repo", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--branch", help="Push to this branch (created if needed).")
@click.option("--message", help="Commit message.")
@endpoint_option
@json_option
@with_registry
def push(registry: Any, ref: str, repo: str, as_json: bool, **options: Any) -> None:
    """Publish REF to the Hub with a model card and its provenance."""
    result = registry.push(ref, repo, **options)
    if as_json:
        echo_json(result)
    elif not result.changed:
        click.echo(f"nothing changed: {result.url} ({result.branch} @ {result.commit[:12]}) already holds {result.ref}")
    else:
        click.echo(f"pushed {result.ref} to {result.url} ({result.branch} @ {result.commit[:12]})")


@pem.command()
@click.option("--pull", "do_pull", is_flag=True, help="Pull new commits of pulled modules as new versions.")
@endpoint_option
@json_option
@with_registry
def sync(registry: Any, do_pull: bool, endpoint: str | None, as_json: bool) -> None:
    """Compare pulled and pushed modules with the Hub."""
    statuses = registry.sync(pull=do_pull, endpoint=endpoint)
    if as_json:
        echo_json(statuses)
        return
    for st in statuses:
        pulled = f"; pulled as {st.pulled}" if st.pulled else ""
        click.echo(f"{st.ref}  {st.direction} {st.repo_id}@{st.revision}  {st.status}: {st.detail}{pulled}")
    if not statuses:
        click.echo("no module was pulled from or pushed to the Hub")


@pem.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--grace", type=float, default=3600.0, show_default=True,
              help="Spare blobs and partial writes younger than this many seconds (writers in flight).")
@json_option
@with_registry
def gc(registry: Any, dry_run: bool, grace: float, as_json: bool) -> None:
    """Delete blobs no module references (and partial writes left by crashes)."""
    report = registry.gc(dry_run=dry_run, grace_seconds=grace)
    if as_json:
        echo_json(report)
        return
    verb = "would delete" if dry_run else "deleted"
    for digest in report.blobs:
        click.echo(f"{verb} blob sha256:{digest}")
    for path in report.temporary_files:
        click.echo(f"{verb} partial write {path}")
    click.echo(f"{len(report.blobs)} blobs, {len(report.temporary_files)} partial writes, {human_size(report.bytes_freed)}")
    if report.kept_temporary_files:
        click.echo(f"kept {report.kept_temporary_files} partial writes ({human_size(report.kept_temporary_bytes)}) younger "
                   f"than the grace period ({grace:g} s): writers may still be running")


# --- the read cache of a remote store -----------------------------------------------------------


@pem.group("cache")
def cache_group() -> None:
    """The local read cache of an s3:// blob store ($PEM_HOME/cache, bounded by PEM_CACHE_SIZE)."""


@cache_group.command("info")
@json_option
@with_registry
def cache_info(registry: Any, as_json: bool) -> None:
    """Files and bytes in the cache, its limit and its folder."""
    info = registry.cache_info()
    if as_json:
        click.echo(json.dumps(info._asdict() if info is not None else None, indent=2))
    elif info is None:
        click.echo(f"no cache: blobs are local ({registry.store.location})")
    else:
        click.echo(f"{info.files} cached blobs, {human_size(info.bytes)} of {human_size(info.limit)} in {info.location}")


@cache_group.command("clear")
@json_option
@with_registry
def cache_clear(registry: Any, as_json: bool) -> None:
    """Delete every cached blob; each is downloaded again when next used."""
    removed = registry.cache_clear()
    if as_json:
        click.echo(json.dumps(removed._asdict() if removed is not None else None, indent=2))
    elif removed is None:
        click.echo(f"no cache: blobs are local ({registry.store.location})")
    else:
        click.echo(f"removed {removed.files} cached blobs, {human_size(removed.bytes)} from {removed.location}")


# --- aliases and metadata ----------------------------------------------------------------------


@pem.group()
def alias() -> None:
    """Movable labels on versions (team/sentiment@prod), with a log of every move."""


@alias.command("set")
@click.argument("name", metavar="NS/NAME", shell_complete=complete_reference)
@click.argument("label", metavar="ALIAS")
@click.argument("version", type=click.IntRange(min=1))
@json_option
@with_registry
def alias_set(registry: Any, name: str, label: str, version: int, as_json: bool) -> None:
    """Point NS/NAME@ALIAS at VERSION."""
    info = registry.set_alias(name, label, version)
    echo_json(info) if as_json else click.echo(f"{info.alias} -> {info.ref}")


@alias.command("rm")
@click.argument("name", metavar="NS/NAME", shell_complete=complete_reference)
@click.argument("label", metavar="ALIAS")
@with_registry
def alias_rm(registry: Any, name: str, label: str) -> None:
    """Remove NS/NAME@ALIAS."""
    info = registry.remove_alias(name, label)
    click.echo(f"removed {info.alias} (was {info.ref})")


@alias.command("list")
@click.argument("name", metavar="[NS/NAME]", required=False, shell_complete=complete_reference)
@json_option
@with_registry
def alias_list(registry: Any, name: str | None, as_json: bool) -> None:
    """List the aliases of NS/NAME, or of every name, and the version each points at."""
    aliases = registry.list_aliases(name)
    if as_json:
        echo_json(aliases)
        return
    for a in aliases:
        click.echo(f"{a.alias} -> {a.ref}")
    if not aliases:
        none = f"{name} has no aliases" if name else "no aliases"
        click.echo(f"{none} (`pem alias set NS/NAME ALIAS VERSION` sets one)")


@alias.command("log")
@click.argument("name", metavar="NS/NAME", shell_complete=complete_reference)
@json_option
@with_registry
def alias_log(registry: Any, name: str, as_json: bool) -> None:
    """Every move of NS/NAME's aliases, oldest first."""
    moves = registry.alias_log(name)
    if as_json:
        echo_json(moves)
        return
    for m in moves:
        before = f"@{m.from_version}" if m.from_version is not None else "(new)"
        after = f"@{m.to_version}" if m.to_version is not None else "(removed)"
        click.echo(f"{m.at.isoformat(timespec='seconds')}  {m.by:<12}  {m.alias}: {before} -> {after}")
    if not moves:
        click.echo(f"{name} has no alias history")


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@click.argument("tags", nargs=-1, metavar="KEY=VALUE...")
@click.option("--rm", "remove", multiple=True, metavar="KEY", help="Remove this tag; repeatable.")
@json_option
@with_registry
def tag(registry: Any, ref: str, tags: tuple[str, ...], remove: tuple[str, ...], as_json: bool) -> None:
    """Set or remove tags of REF (recorded with time and author; tensors never change)."""
    info = registry.tag(ref, _tags_from_options(tags), list(remove))
    echo_json(info) if as_json else click.echo(f"{info.ref}: " + (" ".join(f"{k}={v}" for k, v in info.tags.items()) or "no tags"))


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@click.argument("text", required=False)
@click.option("--clear", is_flag=True, help="Remove the description.")
@with_registry
def describe(registry: Any, ref: str, text: str | None, clear: bool) -> None:
    """Set (or --clear) the description of REF (recorded with time and author)."""
    if (text is None) == (not clear):
        raise click.UsageError("give a TEXT or --clear")
    info = registry.describe(ref, None if clear else text)
    click.echo(f"{info.ref}: {info.description or '(no description)'}")


@pem.command()
@click.argument("ref", shell_complete=complete_reference)
@json_option
@with_registry
def history(registry: Any, ref: str, as_json: bool) -> None:
    """Metadata edits of REF (tags, description), oldest first."""
    changes = registry.history(ref)
    if as_json:
        echo_json(changes)
        return
    for c in changes:
        click.echo(f"{c.at.isoformat(timespec='seconds')}  {c.by:<12}  {c.field}: {c.old!r} -> {c.new!r}")
    if not changes:
        click.echo(f"{registry.resolve(ref).ref} has no metadata edits")


@pem.command()
@home_option
@endpoint_option
@json_option
def doctor(home: str | None, endpoint: str | None, as_json: bool) -> None:
    """Check the database, the blob store, the cache and the Hub endpoint; exit 1 on any FAIL
    (an unreachable Hub is a WARN: only pull, push and sync need it). With a registry URL: the
    server, the API version, the token, the local cache and the Hub."""
    from cli.server_commands import remote_url

    url = remote_url()
    if url is not None:  # the server, the token, the client's cache and the Hub
        from registry.remote import RemoteRegistry

        checks = RemoteRegistry(url, home=home, check_version=False).doctor(endpoint=endpoint)
    else:
        from registry import Registry

        checks = Registry.doctor(home, endpoint=endpoint)
    if as_json:
        echo_json(checks)
    else:
        for c in checks:
            click.echo(f"{'ok' if c.ok else c.status.upper():<5}{c.name:<10}{c.detail}" + (f"  -> {c.fix}" if c.fix else ""))
    if any(c.status == "fail" for c in checks):  # a warning (no Hub) does not fail doctor
        sys.exit(1)


def _register_server_commands() -> None:
    from cli.server_commands import register

    register(pem, home_option, json_option, echo_json)


_register_server_commands()


def main() -> None:
    pem(prog_name="pem")


if __name__ == "__main__":
    main()
