"""Licences in the lineage, the parts that need no store: what a data card records, the
promotion policy's `licences.forbid` (off by default, production only), and how `skyeye
models` and `skyeye audit` print them. The path through MLflow (a stage run's licences
reaching the registered version and refusing production) is tests/test_registry.py's."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from skyeye.audit.records import DataAudit, ModelAudit, Validation
from skyeye.formats.licences import card_licences, forbidden
from skyeye.registry.promotion import PromotionPolicy, load_policy, policy_failures
from skyeye.registry.store import VersionRow, render_versions
from skyeye.tracking.names import TAG_DATA_LICENCES, licences_tag, read_licences

REPO = Path(__file__).resolve().parents[1]
LICENCES = {"geochat": "CC BY-NC 4.0", "rsvqa_hr": "unknown", "ucm_captions": "SkyEye-Synth: generated"}
OFF = {"require_all_benchmarks": False, "require_validation": False, "require_approved_task": False}
FORBID = PromotionPolicy.model_validate({"staging": OFF,
                                         "licences": {"forbid": [" CC BY-NC 4.0 ", "research use only"]}})


def test_a_card_records_licences_and_tags_carry_them(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({"stage1": {}, "licences": LICENCES}))
    assert card_licences(tmp_path) == LICENCES
    assert read_licences(licences_tag(LICENCES)) == LICENCES
    (tmp_path / "card.json").write_text(json.dumps({"stage1": {}}))  # built before licences were recorded
    assert card_licences(tmp_path) is None and licences_tag(None) == {}
    assert read_licences({TAG_DATA_LICENCES: "not json"}) is None
    assert forbidden(LICENCES, ["cc by-nc 4.0"]) == [("geochat", "CC BY-NC 4.0")]


def test_production_refuses_a_forbidden_licence_naming_its_source():
    assert load_policy(REPO / "configs" / "promotion.yaml").licences.forbid == []  # shipped off
    assert policy_failures("production", {}, FORBID, None, None, licences=LICENCES) == [
        "source geochat is 'CC BY-NC 4.0', which production may not carry (rule: licences.forbid)"]
    assert policy_failures("staging", {}, FORBID, None, None, licences=LICENCES) == []
    unrecorded = policy_failures("production", {}, FORBID, None, None, licences=None)
    assert len(unrecorded) == 1 and unrecorded[0].startswith("licences not recorded on the version")
    off = PromotionPolicy.model_validate({"staging": OFF})
    assert policy_failures("production", {}, off, None, None, licences=None) == []
    research = {"rsvg": "Research use only"}
    assert "source rsvg is 'Research use only'" in policy_failures("production", {}, FORBID, None, None,
                                                                    licences=research)[0]


def test_models_and_audit_print_the_licences():
    now = datetime(2026, 12, 6, tzinfo=UTC)
    rows = [VersionRow(2, ["production"], now, 1.0, {}, "abcd1234", "run2", ["vqa"], LICENCES),
            VersionRow(1, [], now, 1.0, {}, "abcd1234", "run1", ["vqa"], None)]
    table = render_versions(rows).splitlines()
    assert table[0].endswith("licences")
    assert table[1].endswith("CC BY-NC 4.0; SkyEye-Synth: generated; unknown") and table[2].endswith("not recorded")
    audit = ModelAudit(model="skyeyegpt", version="2", aliases=["production"], created=None, source=None,
                       source_run=None, training_run="r", tuning_job="missing: -", training_runs=[],
                       data_md5="abcd", data_sources={}, data_git_rev_tag=None, data_revisions="missing: -",
                       validation="missing: -", validations=0, evaluation="missing: -", promotions=[], rollbacks=[],
                       licences=LICENCES)
    text = audit.render()
    assert "    licences (source: terms)\n      geochat: CC BY-NC 4.0\n      rsvqa_hr: unknown" in text
    audit.licences = None
    assert "licences: not recorded" in audit.render()
    data = DataAudit(md5="abcd", asked="abcd", revisions="missing: -", tuning_runs=[], evaluation_runs=[],
                     validations=[Validation("run9", "passed", None, None, LICENCES)], model="skyeyegpt", versions=[])
    assert "  licences (source: terms)\n    geochat: CC BY-NC 4.0" in data.render()
