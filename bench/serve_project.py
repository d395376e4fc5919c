"""A throw-away project for bench/serve_load.py where no `make demo` project is at hand: the
tiny SkyEye-Synth corpus and its instructions, random dim-64 backbones, a model taught to
answer the grounding test question serve_load asks (with a box), registered as version 1
and made production. Generation is far cheaper than the demo model's, so fixed per-request
costs (such as the inference log's) weigh more here than they would there.

    python bench/serve_project.py /tmp/serve_bench
    SKYEYE_PROJECT_ROOT=/tmp/serve_bench python bench/serve_load.py --log compare --levels 16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="an empty or missing folder")
    root = parser.parse_args().root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "mlruns").mkdir(exist_ok=True)
    os.environ["SKYEYE_PROJECT_ROOT"] = str(root)
    sys.path.insert(0, str(REPO))  # the test helpers: a dim-64 model taught a fixed batch
    from PIL import Image

    from skyeye.config import configure_environment
    configure_environment()
    from skyeye.data.instructions import build
    from skyeye.model.tiny import TinyLLMSpec, TinyVisionSpec, save_random_backbones
    from skyeye.model.tokenizer import instruction_texts, train_tokenizer
    from skyeye.registry.promotion import promote
    from skyeye.registry.store import register
    from skyeye.serving.deploy import sample_question
    from skyeye.synth.corpus import synthesize
    from skyeye.tracking import runs
    from tests.support import eval_run, fitted_model, scores

    synthesize(root / "data" / "synth", scale="tiny", seed=0, workers=1, progress=False)
    build(root / "data" / "synth", root / "data" / "instructions")
    tok = train_tokenizer(instruction_texts([root / "data" / "instructions" / "stage1.json"]), root / "tok", 400)
    paths = save_random_backbones(root / "backbones", tok, TinyVisionSpec(image_size=64, patch_size=16,
                                                                          hidden_size=64, layers=2, heads=2),
                                  TinyLLMSpec(hidden_size=64, layers=2, heads=2, intermediate_size=128))
    image, expression = sample_question()
    model = fitted_model(paths | {"tokenizer": paths["llm"]}, [(f"[refer] {expression}", "{<10><20><30><40>}")],
                         [Image.open(image).convert("RGB")])
    folder = model.save(root / "model")
    runs.setup()
    version = register(folder, eval_run(folder, scores(10, 50, 1)))
    promote(version, "production", force=True, reason="bench: serve_load's model")
    print(json.dumps({"root": str(root), "version": version, "question": f"[refer] {expression}"}))


if __name__ == "__main__":
    main()
