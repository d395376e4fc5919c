"""The Great Expectations gate over the instruction and evaluation files.

`validate(instructions_dir, gx_root)` flattens `stage1.json`, `stage2.json` and
`eval/*.json` (docs/data.md) into tables (`skyeye.datagate.tables`), states every
check as a GX expectation on them (`expectations()` below), runs one checkpoint per table
in a file-mode GX context under `gx_root` (Data Docs in
`gx_root/gx/uncommitted/data_docs/local_site/`), and returns a `ValidationResult` that
names each failed expectation with a few offending rows. Domain code: it imports no
orchestrator, so a Prefect task or the CLI can call it as it is.
"""
from __future__ import annotations

# imports inside functions: Great Expectations (seconds to import) loads only when a gate runs
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..config import LeakageConfig
from ..formats.benchmarks import SCORED_FILE_KEYS, VALIDATION_FILE_KEYS
from ..formats.prompts import STAGE_TASKS, TASK_IDENTIFIERS, TASK_TO_IDENTIFIER
from .leakage import HashCache, Leak
from .tables import build_tables


@dataclass(frozen=True)
class Limits:
    """Every bound the gate enforces, in one place."""

    caption_words: tuple[int, int] = (3, 60)  # published RS captions run about 5-30 words
    answer_chars: tuple[int, int] = (1, 400)  # VQA answers and identify descriptions
    turn_chars: int = 4000  # any one turn; detection answers with many boxes are the longest
    boxes_per_turn: tuple[int, int] = (1, 100)  # turns that must carry boxes
    grid: tuple[int, int] = (0, 100)  # box text is pixel / side x 100
    stage1_pairs: tuple[int, int] = (1, 6)
    stage2_pairs: tuple[int, int] = (3, 6)  # docs/data.md: 3 to 6 pairs
    image_side: tuple[int, int] = (32, 4096)  # pixels, each side
    max_bytes: int = 50 * 2**20
    # of its eval file's questions; real RSVQA-LR asks rural/urban once per image (~1%), so the floor is low:
    # the check is there to catch a lost type field (everything in one type), not mild imbalance
    vqa_type_share: tuple[float, float] = (0.005, 0.90)
    examples: int = 5  # offending rows kept per failure


LIMITS = Limits()

# Columns GX returns with each offending row, per table (file and id where they exist).
KEYS = {"files": ["file"], "samples": ["file", "index", "id"],
        "turns": ["file", "index", "id", "turn"], "boxes": ["file", "index", "id", "text"],
        "images": ["file", "id", "path"], "eval_samples": ["file", "index", "id"],
        "leakage": ["file", "id", "path", "train_source", "distance"], "vqa_types": ["file", "question_type"]}

Spec = tuple[str, str, dict[str, Any], str]  # table, GX expectation class, kwargs, description
IN_SET, BETWEEN, NULL, NOT_NULL = ("ExpectColumnValuesToBeInSet", "ExpectColumnValuesToBeBetween",
                                   "ExpectColumnValuesToBeNull", "ExpectColumnValuesToNotBeNull")
GREATER, EQUAL = "ExpectColumnPairValuesAToBeGreaterThanB", "ExpectColumnPairValuesToBeEqual"
UNIQUE, COMPOUND_UNIQUE = "ExpectColumnValuesToBeUnique", "ExpectCompoundColumnsToBeUnique"
EITHER = {"ignore_row_if": "either_value_is_missing"}  # pair checks skip rows lacking a value


def _e(table: str, cls: str, description: str, **kwargs: Any) -> Spec:
    return table, cls, kwargs, description


def expectations(lim: Limits = LIMITS) -> list[Spec]:
    """The checks, as data: kept free of GX objects so this module imports GX lazily."""
    (g0, g1), (w0, w1), (a0, a1) = lim.grid, lim.caption_words, lim.answer_chars
    (side0, side1), (share0, share1) = lim.image_side, lim.vqa_type_share
    stage_tasks = [f"{s}/{t}" for s, tasks in STAGE_TASKS.items() for t in tasks]
    task_identifiers = [f"{t}/{i}" for t, i in TASK_TO_IDENTIFIER.items()] + \
                       [f"conversation/{i}" for i in TASK_IDENTIFIERS]
    stage_pairs = [f"{s}/{n}" for s, (lo, hi) in (("stage1", lim.stage1_pairs), ("stage2", lim.stage2_pairs))
                   for n in range(lo, hi + 1)]
    identifiers = list(TASK_IDENTIFIERS)
    return [
        _e("files", IN_SET, "stage1.json and stage2.json are present", column="exists", value_set=[True]),
        _e("files", NULL, "file parses as JSON", column="parse_error"),
        _e("files", NULL, "file's top-level layout follows docs/data.md", column="schema_error"),
        _e("files", IN_SET, "eval file is a scored (or validation) benchmark/split/task", column="eval_key",
           value_set=SCORED_FILE_KEYS + VALIDATION_FILE_KEYS),
        _e("files", BETWEEN, "file holds at least one sample", column="n_records", min_value=1),

        _e("samples", NULL, "sample has the required keys and types", column="schema_error"),
        _e("samples", NOT_NULL, "sample has an id", column="id"),
        _e("samples", UNIQUE, "sample id unique across stage1 and stage2", column="id"),
        _e("samples", IN_SET, "task is known for its stage", column="stage_task", value_set=stage_tasks),
        _e("samples", IN_SET, "first task identifier matches the sample's task", column="task_identifier",
           value_set=task_identifiers),
        _e("samples", IN_SET, f"turn pairs per sample: stage1 {lim.stage1_pairs}, stage2 {lim.stage2_pairs}",
           column="stage_pairs", value_set=stage_pairs),
        _e("samples", IN_SET, "conversation ends with a gpt turn", column="last_role", value_set=["gpt"]),
        _e("samples", COMPOUND_UNIQUE, "no duplicate sample (same image, prompt and answer)",
           column_list=["media", "prompt_text", "answer_text"]),

        _e("turns", EQUAL, "turns alternate human/gpt, starting with human",
           column_A="role", column_B="expected_role"),
        _e("turns", IN_SET, "human turn starts with a known task identifier", column="identifier",
           value_set=identifiers),
        _e("turns", EQUAL, "<Img><ImageHere></Img> once, in the first human turn only",
           column_A="img_tags", column_B="expected_img_tags"),
        _e("turns", "ExpectColumnValueLengthsToBeBetween",
           f"turn text non-empty, at most {lim.turn_chars} chars", column="value", min_value=1,
           max_value=lim.turn_chars),
        _e("turns", BETWEEN, f"caption {w0}-{w1} words", column="caption_words", min_value=w0, max_value=w1),
        _e("turns", BETWEEN, f"answer {a0}-{a1} chars", column="answer_chars", min_value=a0, max_value=a1),
        _e("turns", BETWEEN, "refer/detection answers and identify prompts carry box text",
           column="required_boxes", min_value=lim.boxes_per_turn[0], max_value=lim.boxes_per_turn[1]),

        _e("boxes", IN_SET, "box text parses as {<x1><y1><x2><y2>}", column="parse_ok", value_set=[True]),
        *[_e("boxes", BETWEEN, f"box text on the {g0}-{g1} grid", column=c, min_value=g0, max_value=g1)
          for c in ("x1", "y1", "x2", "y2")],
        _e("boxes", GREATER, "box text has x1 < x2", column_A="x2", column_B="x1"),
        _e("boxes", GREATER, "box text has y1 < y2", column_A="y2", column_B="y1"),

        _e("images", IN_SET, "referenced image/video file exists", column="exists", value_set=[True]),
        _e("images", NULL, "image decodes fully (PIL); video opens and has frames (av)", column="error"),
        *[_e("images", BETWEEN, f"image {c} {side0}-{side1} px", column=c, min_value=side0, max_value=side1)
          for c in ("width", "height")],
        _e("images", BETWEEN, f"file non-empty and under {lim.max_bytes // 2**20} MB", column="bytes",
           min_value=1, max_value=lim.max_bytes),

        _e("eval_samples", NULL, "eval sample has the keys of its task", column="schema_error"),
        _e("eval_samples", NOT_NULL, "eval sample has an id", column="id"),
        _e("eval_samples", COMPOUND_UNIQUE, "eval sample id unique within its file",
           column_list=["file", "id"]),
        _e("eval_samples", IN_SET, "eval prompt starts with a known task identifier",
           column="prompt_identifier", value_set=identifiers),
        _e("eval_samples", BETWEEN, "caption sample has references", column="n_references", min_value=1),
        _e("eval_samples", BETWEEN, f"every reference at least {w0} words", column="ref_words_min",
           min_value=w0),
        _e("eval_samples", BETWEEN, f"every reference at most {w1} words", column="ref_words_max",
           max_value=w1),
        _e("eval_samples", BETWEEN, f"answer {a0}-{a1} chars", column="answer_chars",
           min_value=a0, max_value=a1),
        *[_e("eval_samples", BETWEEN, "eval box (pixels) not below 0", column=c, min_value=0)
          for c in ("x1", "y1")],
        _e("eval_samples", GREATER, "eval box has x1 < x2", column_A="x2", column_B="x1", **EITHER),
        _e("eval_samples", GREATER, "eval box has y1 < y2", column_A="y2", column_B="y1", **EITHER),
        _e("eval_samples", GREATER, "eval box inside the image (x2 <= width)",
           column_A="width", column_B="x2", or_equal=True, **EITHER),
        _e("eval_samples", GREATER, "eval box inside the image (y2 <= height)",
           column_A="height", column_B="y2", or_equal=True, **EITHER),
        *[_e("eval_samples", EQUAL, f"declared image_size {c} matches the image", column_A=c,
             column_B=f"actual_{c}", **EITHER) for c in ("width", "height")],

        _e("leakage", NULL, "eval image not used by a training instruction: same path, same bytes or a pHash "
           "near-duplicate (leakage; every pair in leaks)", column="train_id"),
        _e("vqa_types", BETWEEN, f"each VQA question type {share0:.0%}-{share1:.0%} of its file's questions",
           column="share", min_value=share0, max_value=share1),
    ]


@dataclass
class Failure:
    table: str
    expectation: str  # GX expectation type, e.g. expect_column_values_to_be_between
    column: str | None  # column, or "a,b" for pair and compound expectations
    description: str
    unexpected_count: int
    examples: list[dict[str, Any]] = field(default_factory=list)  # offending rows: file, id, value


@dataclass
class ValidationResult:
    success: bool
    n_records: int  # instruction samples + eval samples
    seconds: float
    failures: list[Failure] = field(default_factory=list)
    data_docs_index: Path | None = None
    n_instructions: int = 0
    n_eval: int = 0
    n_expectations: int = 0
    leaks: list[dict[str, Any]] = field(default_factory=list)  # every leak pair (leakage.Leak), by eval file and index
    hashes_computed: int = 0  # pHashes not found in the hash cache (0 on a second run over the same data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_docs_index"] = str(self.data_docs_index) if self.data_docs_index else None
        return out

    def render(self) -> str:
        head = (f"Validation {'PASSED' if self.success else 'FAILED'}: {len(self.failures)} of "
                f"{self.n_expectations} expectations failed over {self.n_records} records "
                f"({self.n_instructions} instructions, {self.n_eval} eval) in {self.seconds:.1f} s")
        lines = [head]
        for f in self.failures:
            where = f"{f.table}.{f.column}" if f.column else f.table
            lines.append(f"- [{where}] {f.description}: {f.unexpected_count} unexpected ({f.expectation})")
            lines += ["    " + ", ".join(f"{k}={v}" for k, v in row.items()) for row in f.examples[:3]]
        if self.leaks:
            lines.append(f"Leakage: {len(self.leaks)} pairs (eval image ~ training sample), first ones:")
            lines += [f"    {Leak(**x).render()}" for x in self.leaks[:5]]
        if self.data_docs_index:
            lines.append(f"Data Docs: {self.data_docs_index}")
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    """JSON-safe, short: numpy scalars to Python, long text cut."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return None if value != value else int(value) if value.is_integer() else value
    if isinstance(value, str) and len(value) > 120:
        return value[:117] + "..."
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _failure(table: str, res: Any, lim: Limits) -> Failure:
    cfg, result = res.expectation_config, res.result or {}
    kw = cfg.kwargs
    column = kw.get("column") or ",".join(kw.get("column_list") or
                                          [c for c in (kw.get("column_A"), kw.get("column_B")) if c]) or None
    description = cfg.description or cfg.type
    info = res.exception_info or {}
    if info.get("raised_exception"):  # a broken check must not read as a pass
        description += f" (GX raised: {str(info.get('exception_message'))[:200]})"
    rows = result.get("partial_unexpected_index_list") or \
        [{"value": v} for v in result.get("partial_unexpected_list") or []]
    order = {k: i for i, k in enumerate(KEYS[table])}  # file, id, ... first, then the value
    examples = [{k: _plain(row[k]) for k in sorted(row, key=lambda k: order.get(k, len(order)))}
                for row in rows[: lim.examples]]
    return Failure(table, cfg.type, column, description, int(result.get("unexpected_count") or 0), examples)


def _context(gx_root: Path) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(gx_root))
    if ctx.config.analytics_enabled is not False:  # first use: offline machine, quiet logs
        ctx.config.analytics_enabled = False
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ctx.variables.save()
    return ctx


def validate(instructions_dir: Path, gx_root: Path, *, data_docs: bool = True, limits: Limits = LIMITS,
             leakage: LeakageConfig | None = None, hash_cache: Path | None = None,
             near_duplicates: bool = True) -> ValidationResult:
    """Run the gate; never raises on bad data (bad files are failures in the result).
    `leakage` (default: LeakageConfig()) sets the near-duplicate threshold; pHashes are kept
    in `hash_cache` (None: in memory, this run only); `near_duplicates=False` leaves only the
    same-path leakage check (what bench/leakage.py compares against)."""
    start = time.perf_counter()
    cfg = (leakage or LeakageConfig()) if near_duplicates else None
    cache = HashCache(hash_cache)
    tables = build_tables(Path(instructions_dir), leakage=cfg, cache=cache)

    import great_expectations as gx  # heavy (seconds): only when a gate actually runs
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    Path(gx_root).mkdir(parents=True, exist_ok=True)
    ctx = _context(Path(gx_root))
    source = ctx.data_sources.add_or_update_pandas("skyeye")
    specs = expectations(limits)
    failures: list[Failure] = []
    rendered: list[Any] = []  # validation results and suites to render in Data Docs
    # One checkpoint per table: a checkpoint's batch parameters (the dataframe) go to
    # every validation definition in it, so tables cannot share one.
    for table, frame in tables.frames.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole")
        suite = ctx.suites.add_or_update(gx.ExpectationSuite(
            name=f"skyeye_{table}",
            expectations=[getattr(gxe, cls)(**kw, description=desc)
                          for t, cls, kw, desc in specs if t == table]))
        definition = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"skyeye_{table}", data=batch, suite=suite))
        checkpoint = ctx.checkpoints.add_or_update(gx.Checkpoint(
            name=f"skyeye_{table}", validation_definitions=[definition],
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": KEYS[table],
                           "partial_unexpected_count": 20}))
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        for result_id, suite_result in run.run_results.items():
            failures += [_failure(table, r, limits) for r in suite_result.results if not r.success]
            rendered += [result_id, ExpectationSuiteIdentifier(name=suite.name)]

    index = None
    if data_docs:
        # What UpdateDataDocsAction does per checkpoint, done once for all tables: the
        # site build (Jinja set-up, index page) dominates, so 8 builds cost 8 times as much.
        ctx.build_data_docs(resource_identifiers=rendered)
        for site in ctx.get_docs_sites_urls(only_if_exists=True):
            index = Path(unquote(urlparse(site["site_url"]).path))
    return ValidationResult(success=not failures, n_records=tables.n_instructions + tables.n_eval,
                            seconds=time.perf_counter() - start, failures=failures, data_docs_index=index,
                            n_instructions=tables.n_instructions, n_eval=tables.n_eval,
                            n_expectations=len(specs), leaks=[asdict(x) for x in tables.leaks],
                            hashes_computed=cache.computed)
