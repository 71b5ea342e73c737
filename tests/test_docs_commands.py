"""Every `cloudtune ...` command the docs, the examples and the CLI's own messages tell a user to type exists.

Why: a renamed flag or command breaks every page and error message that names it, and nothing but a
user notices. This module collects each invocation from
  - README.md and docs/**/*.md: lines of fenced blocks that start with `cloudtune` (after `$ ` or
    `VAR=value` prefixes, split at `&&`/`;`, `# comment` tails dropped, `\\` continuations joined)
    and backticked `cloudtune ...` spans anywhere;
  - examples/*.yaml: the `#   cloudtune ...` header comments;
  - string literals of cloudtune/**/*.py and providers/**/*.py: backticked `cloudtune ...` spans
    (f-string fields become the placeholder `{}`), e.g. "run `cloudtune controller tick --store URL`";
    docstrings only where they are help texts (the command functions of cloudtune/cli/),
and checks it statically against the real click tree (`typer.main.get_command` of the registered
app): the subcommand path exists, every flag is an option of that command, a value is one of the
option's choices where the CLI has a fixed set (taken from the CLI's own constants, not repeated
here), and the number of positional arguments fits. Usage-synopsis syntax is understood: `[...]`
is optional, `a|b` alternatives (`\\|` in tables), upper-case words, `<job-id>`, `{}`, single
lower-case letters (`-p a,b`) and anything with `...` are placeholders; a bare `...` elides the
rest; a bare `cloudtune CMD` names the command and needs no arguments. The same goes for loose
`--flag` mentions in the CLI's messages ("pass --all-regions"): each must be some command's option.

Then the cheap, offline ones run for real, in process (typer's runner, the real `cloudtune.cli.main`
error handling): plans with a size, `models`, `catalog show`, status/cost/controller status on an
empty home (exit 0), the job commands on an unknown job (exit 2, as docs/operations.md's table
says), `check` of each example header's spec and providers without credentials (exit 2; 0 for the
local quickstart), and `--help` of every command in the tree.
"""

from __future__ import annotations

import ast
import copy
import difflib
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CODE_FILES = sorted([*(ROOT / "cloudtune").rglob("*.py"), *(ROOT / "providers").rglob("*.py")])
# Modules whose strings are the CLI's messages to users: a loose `--flag` in them must exist somewhere.
MESSAGE_FILES = sorted([*(ROOT / "cloudtune" / "cli").glob("*.py"), ROOT / "cloudtune" / "preflight.py",
                        *(ROOT / "cloudtune" / "planner").glob("*.py"), ROOT / "cloudtune" / "catalog.py",
                        ROOT / "cloudtune" / "run" / "controller.py", ROOT / "cloudtune" / "run" / "cost.py",
                        ROOT / "cloudtune" / "run" / "gc.py", ROOT / "cloudtune" / "run" / "orchestrator.py"])
# Flags of other programs these messages quote (file -> flags): llama.cpp's converter, docker buildx.
FOREIGN_FLAGS = {"cloudtune/export/gguf.py": {"--outfile", "--outtype"}, "cloudtune/preflight.py": {"--platform"}}


# ------------------------------------------------------------------------------------ the tree


def root_app() -> typer.Typer:
    """The real `cloudtune` app with every command module registered, without touching the global one."""
    from cloudtune import cli
    from cloudtune.cli import commands

    app = copy.copy(cli.app)
    app.registered_commands, app.registered_groups = [], []
    for module in commands.MODULES:
        module.register(app)
    return app


APP = root_app()
TREE = typer.main.get_command(APP)


def _choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """(command path, option) -> the values the CLI accepts, from the CLI's own constants."""
    from cloudtune.providers import KNOWN_PROVIDERS

    from cloudtune.cli import controller_cmd, plan_cmd
    from cloudtune.export import gguf, merge
    from cloudtune.run.controller import CONTROLLERS

    out: dict[tuple[str, str], tuple[str, ...]] = {
        ("plan", "--method"): plan_cmd.METHODS,
        ("plan", "--optimizer"): plan_cmd.OPTIMIZERS + tuple(plan_cmd.OPTIMIZER_ALIASES),
        ("plan", "--attention"): plan_cmd.ATTENTIONS,
        ("plan", "--sharding"): plan_cmd.SHARDINGS,
        ("plan", "--full-precision"): plan_cmd.FULL_PRECISIONS,
        ("plan", "--exclude"): KNOWN_PROVIDERS,
        ("run", "--controller"): tuple(CONTROLLERS),
        ("controller deploy", "--on"): controller_cmd.TARGETS,
        ("controller remove", "--on"): controller_cmd.TARGETS,
        ("controller hand-over", "--to"): tuple(CONTROLLERS),
        ("merge", "--dtype"): merge.DTYPES,
        ("export gguf", "--quant"): gguf.OUTTYPES,
    }
    for path, cmd in leaves():
        for p in cmd.params:
            if getattr(p.type, "choices", None):  # a click Choice, should one appear
                for opt in p.opts:
                    out[(path, opt)] = tuple(map(str, p.type.choices))
            if "--provider" in getattr(p, "opts", ()):
                for opt in p.opts:
                    out[(path, opt)] = KNOWN_PROVIDERS
    return out


def leaves(cmd=None, path: str = "") -> Iterator[tuple[str, object]]:
    cmd = cmd or TREE
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd
        return
    for name, sub in subs.items():
        yield from leaves(sub, f"{path} {name}".strip())


CHOICES = _choices()
LIST_OPTIONS = {"--provider", "-p", "--exclude", "--gpu", "-g", "--region", "--secret-env"}  # a,b lists


# ------------------------------------------------------------------------------------ extraction


@dataclass
class Invocation:
    where: str  # file:line
    text: str  # from `cloudtune` on
    kind: str  # fenced, inline, yaml, code

    def __str__(self) -> str:
        return f"{self.where}: `{self.text}`"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _segments(line: str) -> list[str]:
    """The `cloudtune ...` commands of one shell line: split at && and ;, env prefixes and `$ ` dropped."""
    out = []
    for seg in re.split(r"\s*(?:&&|;|\|\|)\s*", line):
        seg = re.sub(r"^\$\s+", "", seg.strip())
        seg = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", seg)
        if seg.startswith("cloudtune "):
            out.append(seg)
    return out


SPAN = re.compile(r"`(cloudtune(?: [^`]*)?)`")
# `run --dry-run`, `catalog refresh --provider modal`: a command named without `cloudtune`, with a flag or
# subcommand; read as `cloudtune ... ...` (its arguments elided).
_TOP = "|".join(sorted(TREE.commands))
REF = re.compile(rf"`((?:{_TOP})(?: [a-z][a-z-]*)*(?: --?[a-z][\w-]*(?: [\w,./:-]+)?)+"
                 r"|(?:catalog|export|controller) [a-z][a-z-]*)`")


def spans(line: str) -> list[tuple[str, str]]:
    """(text, kind) of the backticked commands in one line of prose or one string literal."""
    return [(m, "inline") for m in SPAN.findall(line)] + [(f"cloudtune {m} ...", "ref") for m in REF.findall(line)]


def from_markdown(path: Path) -> list[Invocation]:
    out: list[Invocation] = []
    lines = path.read_text().splitlines()
    fenced, i = False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fenced = not fenced
            i += 1
            continue
        if fenced:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):  # shell continuation
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            code = re.sub(r"\s+#\s.*$", "", line)
            segs = _segments(code)
            out += [Invocation(f"{_rel(path)}:{start}", s, "fenced") for s in segs]
            if not segs:
                out += [Invocation(f"{_rel(path)}:{start}", m, k) for m, k in spans(line)]
        else:
            out += [Invocation(f"{_rel(path)}:{start}", m, k) for m, k in spans(line)]
        i += 1
    return out


def from_yaml_comments(path: Path) -> list[Invocation]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^#\s+(cloudtune .*?)(?:\s{2,}\(.*\))?\s*$", line)
        if m:
            out.append(Invocation(f"{_rel(path)}:{n}", m.group(1), "yaml"))
    return out


def _literals(node: ast.AST) -> list[str]:
    """A string literal's text; an f-string's with each field as `{}`, except `'x' if c else 'y'` fields,
    which give one text per branch (`cloudtune gc{' --foreign' if foreign else ''} --yes` is two commands)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if not isinstance(node, ast.JoinedStr):
        return []
    texts = [""]
    for v in node.values:
        if isinstance(v, ast.Constant):
            parts = [str(v.value)]
        elif (isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.IfExp)
              and all(isinstance(b, ast.Constant) and isinstance(b.value, str) for b in (v.value.body, v.value.orelse))):
            parts = [v.value.body.value, v.value.orelse.value]
        else:
            parts = ["{}"]
        texts = [t + p for t in texts for p in parts][:16]
    return texts


def from_code(path: Path) -> list[Invocation]:
    out = []
    tree = ast.parse(path.read_text())
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    # Docstrings are for developers, except a CLI command's, which is its --help text.
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body \
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant) \
                and not (isinstance(n, ast.FunctionDef) and path.parent.name == "cli"):
            inner.add(id(n.body[0].value))
    for node in ast.walk(tree):
        for text in [] if id(node) in inner else _literals(node):
            for pattern, form in ((SPAN, "{}"), (REF, "cloudtune {} ...")):
                for m in pattern.finditer(text):
                    line = node.lineno + text[: m.start()].count("\n")
                    inv = Invocation(f"{_rel(path)}:{line}", form.format(" ".join(m.group(1).split())), "code")
                    if inv not in out:
                        out.append(inv)
    return out


def all_invocations() -> list[Invocation]:
    out: list[Invocation] = []
    for p in DOC_FILES:
        out += from_markdown(p)
    for p in EXAMPLES:
        out += from_yaml_comments(p)
    for p in CODE_FILES:
        out += from_code(p)
    return out


# ------------------------------------------------------------------------------------ checking

PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?|<[^>]+>|\{\}|[a-z]|.*\.\.\..*")


@dataclass
class Token:
    text: str
    optional: bool  # inside [ ]
    alts: list[str] = field(default_factory=list)  # a|b


def tokens(text: str) -> list[Token]:
    text = text.replace("\\|", "|")
    try:
        raw = shlex.split(text)
    except ValueError:
        raw = text.split()
    out, depth = [], 0
    for r in raw:
        opens = len(r) - len(r.lstrip("["))
        depth += opens
        core = r.lstrip("[").rstrip("]")
        optional = depth > 0
        depth -= len(r) - len(r.rstrip("]"))
        if core in ("", "|"):
            continue
        alts = [a for a in core.split("|") if a]
        out.append(Token(core, optional, alts))
    return out


def is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER.fullmatch(value))


def check(inv: Invocation) -> list[str]:
    """What is wrong with one invocation, as `file:line: problem` lines (none when it fits the tree)."""
    where = f"{inv.where}: `{inv.text}`"
    listed = re.fullmatch(r"cloudtune ((?:[a-z-]+ )*?)([a-z-]+(?: ?\| ?[a-z-]+)+)", inv.text)
    if listed:  # `cloudtune catalog show|refresh`: names commands of one group
        return [p for name in re.split(r" ?\| ?", listed.group(2))
                for p in check(Invocation(inv.where, f"cloudtune {listed.group(1)}{name}", inv.kind))]
    toks = tokens(inv.text)[1:]  # drop `cloudtune`
    cmd, path = TREE, []
    while getattr(cmd, "commands", None) is not None and toks and not toks[0].text.startswith("-"):
        name = toks[0].text
        if is_placeholder(name):
            return []  # `cloudtune ...`, `cloudtune CMD`: any command
        if name not in cmd.commands:
            near = difflib.get_close_matches(name, list(cmd.commands), n=1)
            hint = f" (did you mean {' '.join([*path, near[0]])!r}?)" if near else ""
            return [f"{where}: no command `cloudtune {' '.join([*path, name])}`{hint}"]
        cmd, path = cmd.commands[name], [*path, name]
        toks = toks[1:]
    key = " ".join(path)
    if not toks:
        return []  # `cloudtune run`: names the command
    if getattr(cmd, "commands", None) is not None:
        if all(t.text in ("--help", "-h", "--version") or is_placeholder(t.text) for t in toks):
            return []
        return [f"{where}: `cloudtune {key}` is a group; give one of its commands ({', '.join(cmd.commands)})"]
    options = {o: p for p in cmd.params if p.param_type_name == "option" for o in [*p.opts, *p.secondary_opts]}
    problems, positional, required_seen, elided, given = [], 0, 0, False, set()
    i = 0
    while i < len(toks):
        t = toks[i]
        i += 1
        if t.text == "...":
            elided = True
            continue
        if t.text.startswith("-") and len(t.text) > 1 and not is_placeholder(t.text):
            for alt in t.alts:
                flag, eq, inline_value = alt.partition("=")
                if flag == "--help":
                    continue
                p = options.get(flag)
                given.add(id(p))
                if p is None:
                    near = difflib.get_close_matches(flag, list(options), n=1)
                    hint = f"; did you mean {near[0]}?" if near else ""
                    problems.append(f"{where}: `cloudtune {key}` has no option {flag}{hint}")
                    continue
                if p.is_flag or getattr(p, "count", False):
                    continue
                if eq:
                    values = [inline_value]
                elif len(t.alts) == 1 and i < len(toks):
                    values = toks[i].alts
                    elided |= toks[i].text == "..."
                    i += 1
                else:
                    if len(t.alts) == 1 and not elided:
                        problems.append(f"{where}: {flag} needs a value")
                    continue
                allowed = CHOICES.get((key, flag))
                if allowed:
                    for v in values:
                        items = v.split(",") if flag in LIST_OPTIONS else [v]
                        for item in items:
                            if item and not is_placeholder(item) and item not in allowed:
                                problems.append(f"{where}: {flag} {item!r} is not one of {', '.join(allowed)}")
            continue
        positional += 1
        required_seen += not t.optional
    args = [p for p in cmd.params if p.param_type_name == "argument"]
    most = float("inf") if any(p.nargs == -1 for p in args) else sum(p.nargs for p in args)
    least = sum(p.nargs for p in args if p.required and p.nargs > 0)
    if positional > most:
        problems.append(f"{where}: `cloudtune {key}` takes at most {most} positional argument(s), got {positional}")
    for p in cmd.params:
        if p.param_type_name == "option" and p.required and id(p) not in given and not elided:
            problems.append(f"{where}: `cloudtune {key}` needs {'/'.join(p.opts)}")
    if required_seen < least and not elided:
        problems.append(f"{where}: `cloudtune {key}` needs {least} positional argument(s) "
                        f"({', '.join(p.human_readable_name for p in args if p.required)}), got {required_seen}")
    return problems


INVOCATIONS = all_invocations()


def test_the_extractor_finds_the_commands_each_source_holds():
    """Guards the extraction itself: a regex that silently finds nothing would make the check pass."""
    by_file: dict[str, int] = {}
    for inv in INVOCATIONS:
        f = inv.where.rsplit(":", 1)[0]
        by_file[f] = by_file.get(f, 0) + 1
    for f, at_least in {"README.md": 11, "docs/controller.md": 11, "docs/planner.md": 5, "docs/operations.md": 4,
                        "docs/export.md": 2, "docs/providers/lambda.md": 1, "docs/providers/modal.md": 1,
                        "docs/providers/runpod.md": 1, "docs/first-cloud-job.md": 10,
                        "cloudtune/cli/controller_cmd.py": 2, "cloudtune/cli/plan_cmd.py": 2}.items():
        assert by_file.get(f, 0) >= at_least, f"{f}: found {by_file.get(f, 0)} commands, expected >= {at_least}"
    assert sum(1 for i in INVOCATIONS if i.kind == "yaml") >= len(EXAMPLES)
    texts = {i.text for i in INVOCATIONS}
    # the synopsis, continuation and f-string forms are read whole
    assert "cloudtune cost [JOB] [--json|--csv]" in texts
    assert any(t.startswith("cloudtune controller deploy --on aws-lambda --store s3://") and "--role-arn" in t
               for t in texts)
    assert any("{}" in t for t in texts)
    assert "cloudtune gc --foreign --yes" in texts and "cloudtune gc --yes" in texts  # both branches of an f-string
    assert "cloudtune catalog refresh --provider modal ..." in texts  # `catalog refresh --provider modal` in prose


def test_every_command_written_in_docs_examples_and_messages_fits_the_cli():
    problems = [p for inv in INVOCATIONS for p in check(inv)]
    assert not problems, f"{len(problems)} of {len(INVOCATIONS)} commands do not fit the CLI:\n" + "\n".join(problems)


@pytest.mark.parametrize(("text", "complaint"), [
    ("cloudtune plan --modle 8b", "has no option --modle; did you mean --model?"),
    ("cloudtune plan -m 8b --method qlra", "--method 'qlra' is not one of full, lora, qlora"),
    ("cloudtune plan -m 8b --sharding fsdp2", "--sharding 'fsdp2'"),
    ("cloudtune controller deploy --on lambda --store s3://b", "--on 'lambda' is not one of"),
    ("cloudtune run job.yaml -p runpod,lamda", "-p 'lamda' is not one of local, aws"),
    ("cloudtune catalog list", "no command `cloudtune catalog list`"),
    ("cloudtune logs JOB extra", "at most 1 positional"),
    ("cloudtune stop --wait", "needs 1 positional"),
    ("cloudtune cost [JOB] [--json|--csvv]", "has no option --csvv"),
    ("cloudtune controller --store s3://b", "is a group"),
    ("cloudtune plan --top", "--top needs a value"),
    ("cloudtune controller tick --seconds 5", "`cloudtune controller tick` needs --store"),
    ("cloudtune gc --foriegn --yes ...", "has no option --foriegn; did you mean --foreign?"),
])
def test_the_check_catches_renamed_flags_commands_choices_and_arity(text, complaint):
    problems = check(Invocation("x.md:1", text, "inline"))
    assert any(complaint in p for p in problems), problems


@pytest.mark.parametrize("text", [
    "cloudtune run", "cloudtune controller", "cloudtune run ... --dry-run", "cloudtune gc [-p a,b | -p a -p b] [--json]",
    "cloudtune export gguf JOB [OUT.gguf] [--quant q8_0|f16|bf16|f32] [--converter PATH] [--json]",
    "cloudtune controller deploy --on {} --store {}", "cloudtune plan --model=8b --method=qlora",
    "cloudtune catalog refresh [--provider P ...]", "cloudtune status <job-id>", "cloudtune run --controller ...",
    "cloudtune ...",
])
def test_the_check_reads_synopsis_syntax(text):
    assert check(Invocation("x.md:1", text, "inline")) == []


def test_flags_named_in_the_clis_messages_exist():
    """"pass --all-regions", "use --provider local": each loose flag in a message is some command's option."""
    known = {"--help", "--version"}
    for _, cmd in leaves():
        known |= {o for p in cmd.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}
    problems = []
    for path in MESSAGE_FILES:
        foreign = FOREIGN_FLAGS.get(_rel(path), set())
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for m in re.finditer(r"(?<![\w*-])--[a-z][a-z0-9-]+", "\n".join(_literals(node))):
                if m.group(0) not in known and m.group(0) not in foreign:
                    problems.append(f"{_rel(path)}:{node.lineno}: {m.group(0)} is no cloudtune option")
    assert not problems, "\n".join(sorted(set(problems)))


# ------------------------------------------------------------------------------------ run for real


@dataclass
class Ran:
    exit_code: int
    output: str


def invoke(argv: list[str]) -> Ran:
    """One command in process, handled as `cloudtune.cli.main` handles it (UserError: one line, its exit code)."""
    from cloudtune.providers.base import ProviderError

    from cloudtune.errors import UserError

    r = CliRunner().invoke(APP, argv)
    out = r.stdout + r.stderr
    if isinstance(r.exception, UserError):
        return Ran(r.exception.exit_code, out + f"error: {r.exception}\n")
    if isinstance(r.exception, ProviderError):
        return Ran(3, out + f"error: {r.exception}\n")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Ran(r.exit_code, out)


# The offline commands: run as written (exit 0), or with their job placeholder as an unknown job (exit 2,
# docs/operations.md: "2 unknown job"), or `catalog refresh` without keys (exit 1, each provider skipped
# with the key it needs). Everything else (run, gc, deploy, pull of a real job) rents, calls a provider
# or needs a finished job; tests/test_first_cloud_job_doc.py runs those against fakes.
OFFLINE_OK = {"plan", "models", "catalog show", "status", "cost", "controller status"}
UNKNOWN_JOB = {"status", "logs", "stop", "cost", "pull", "merge", "export gguf", "controller hand-over"}


OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
JOB_WORDS = ("JOB", "<job-id>", "{}")


def variants(text: str) -> list[list[str]]:
    """The argvs an invocation stands for that can run here: the synopsis without its optional `[...]`
    parts, then with each optional part that is a job placeholder or bare flags (`[--json|--csv]`: each
    alternative). None with another placeholder (SPEC, URL, `...`, a value to choose)."""
    text = text.replace("\\|", "|")
    base = OPTIONAL.sub("", text)
    out = [base]
    for part in OPTIONAL.findall(text):
        alts = [a.strip() for a in part.split("|")]
        if all(re.fullmatch(r"--[a-z-]+|-[a-z]", a) for a in alts) or part.strip() in JOB_WORDS:
            out += [f"{base} {a}" for a in alts]
    argvs = []
    for v in out:
        argv = shlex.split(v)[1:]
        if all(a in JOB_WORDS or not (is_placeholder(a) or re.search(r"[|\[\]{}<>]|\.\.\.", a)) for a in argv):
            argvs.append(argv)
    return argvs


def _path_of(argv: list[str]) -> str:
    cmd, path = TREE, []
    for a in argv:
        subs = getattr(cmd, "commands", None)
        if subs is None or a not in subs:
            break
        cmd, path = subs[a], [*path, a]
    return " ".join(path)


def offline_runs() -> list[tuple[Invocation, list[str], int]]:
    """(where, argv, the exit code the docs imply) for each distinct offline command written anywhere."""
    runs, seen = [], set()
    for inv in INVOCATIONS:
        if inv.where.startswith("docs/first-cloud-job.md"):
            continue  # tests/test_first_cloud_job_doc.py runs that page, in order, against the fakes
        for argv in variants(inv.text):
            path = _path_of(argv)
            rest = argv[len(path.split()):] if path else argv
            if (not rest and inv.kind in ("inline", "code")) or (path == "plan" and not (
                    {"-m", "--model", "--spec"} & set(rest) or (rest and rest[0][0] != "-"))):
                continue  # prose naming a command (`cloudtune plan`, `cloudtune plan --json`), not one to type
            if any(a in JOB_WORDS for a in rest):
                if path not in UNKNOWN_JOB:
                    continue
                argv, want = [a if a not in JOB_WORDS else "no-such-job" for a in argv], 2
            elif path in OFFLINE_OK and not (path in ("status", "cost") and [a for a in rest if a[0] != "-"]):
                want = 0
            elif path == "catalog refresh":
                asked = ",".join(a for j, a in enumerate(rest) if j and rest[j - 1] in ("-p", "--provider"))
                # "needs that provider's API key": without one a provider is skipped, exit 1 when all are;
                # Modal's rows are its published rates, refreshed without a key (docs/providers/modal.md)
                want = 0 if not asked or "modal" in asked.split(",") else 1
            else:
                continue
            if tuple(argv) not in seen:
                seen.add(tuple(argv))
                runs.append((inv, argv, want))
    return runs


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty home, no provider or AWS credentials, no network (hub offline, IMDS off), a cwd with the
    docs' relative paths: examples/ and a data.jsonl."""
    for k in ("RUNPOD_API_KEY", "VAST_API_KEY", "LAMBDA_API_KEY", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_PROFILE", "CLOUDTUNE_LAMBDA_SSH_KEY", "CLOUDTUNE_PROVIDER_CONFIG", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # no ~/.runpod, ~/.lambda_cloud, ~/.modal.toml, ~/.sky
    monkeypatch.setenv("COLUMNS", "200")
    cwd = tmp_path / "cwd"
    shutil.copytree(ROOT / "examples", cwd / "examples")
    shutil.copy(ROOT / "examples" / "data" / "reverse.jsonl", cwd / "data.jsonl")
    monkeypatch.chdir(cwd)
    return cwd


def test_the_offline_commands_of_the_docs_run_with_the_exit_code_they_imply(offline):
    runs = offline_runs()
    paths = {_path_of(argv) for _, argv, _ in runs}
    assert {"plan", "models", "catalog show", "catalog refresh", "status", "cost", "logs", "stop", "controller status",
            "controller hand-over", "merge", "export gguf"} <= paths, paths
    failures = []
    for inv, argv, want in runs:
        r = invoke(argv)
        if r.exit_code != want:
            failures.append(f"{inv}: ran `cloudtune {shlex.join(argv)}`, exit {r.exit_code}, the doc implies {want}:\n"
                            + r.output[-1500:])
        elif want == 2:
            assert r.output.count("\n") <= 3 and "Traceback" not in r.output, r.output
        if argv[:2] == ["catalog", "refresh"]:
            for line in r.output.splitlines():
                assert re.match(r"\w+: (ok: \d+ offers|skipped: no usable credentials: .*(set|write) )", line), line
    assert not failures, "\n".join(failures)


def test_each_examples_header_run_passes_check_up_to_the_missing_credentials(offline):
    """`# cloudtune run examples/X.yaml --provider a,b` in each example: its spec and providers are valid; what a
    machine without credentials lacks is listed (exit 2, one line each); the local quickstart needs nothing."""
    headers = [i for i in INVOCATIONS if i.kind == "yaml" and i.text.startswith("cloudtune run ")]
    assert len(headers) >= 4
    for inv in headers:
        argv = shlex.split(inv.text)[2:]
        spec, providers = argv[0], [a for j, a in enumerate(argv) if j and argv[j - 1] in ("-p", "--provider")]
        r = invoke(["check", spec, *(["-p", ",".join(providers)] if providers else [])])
        if providers:
            assert r.exit_code == 2, f"{inv}: check exited {r.exit_code}:\n{r.output[-2000:]}"
            assert "Traceback" not in r.output and "unknown" not in r.output, r.output
            for p in ",".join(providers).split(","):
                assert f"provider {p}:" in r.output, f"{inv}: check says nothing about provider {p}:\n{r.output}"
        else:
            assert r.exit_code == 0, f"{inv}: check exited {r.exit_code}:\n{r.output[-2000:]}"


def test_help_of_every_command_renders():
    paths = [""]
    for path, _ in leaves():
        words = path.split()
        paths += [" ".join(words[:n]) for n in range(1, len(words) + 1) if " ".join(words[:n]) not in paths]
    assert len(paths) > 20
    for path in paths:
        r = invoke([*path.split(), "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, f"cloudtune {path} --help: exit {r.exit_code}\n{r.output}"
