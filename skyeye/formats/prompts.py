"""Task identifiers, the image placeholder and instruction phrasings (SkyEye-968k style,
MiniGPT-v2 format): the one home of the prompt vocabulary, for the builder, the model's
tokenizer and template, the data gate and the evaluation.

Several phrasings per task keep the model from keying on one sentence; the evaluation
uses the first phrasing of each task, as the paper's prompts do.
"""
from __future__ import annotations

import zlib

IMAGE_PLACEHOLDER = "<Img><ImageHere></Img>"
# frames a clip enters as: the instruction files' `frames`, the model's `vision.video_frames` by default
VIDEO_FRAMES = 4
TASK_IDENTIFIERS = ("[caption]", "[vqa]", "[refer]", "[identify]", "[detection]")
# task (the instruction file's `task` field) -> task identifier
TASK_TO_IDENTIFIER = {"caption": "[caption]", "video_caption": "[caption]", "vqa": "[vqa]", "scene_vqa": "[vqa]",
                      "refer": "[refer]", "identify": "[identify]", "detection": "[detection]"}
# the bench task (`benchmarks.TASKS`) whose scores stand behind each identifier's answers
IDENTIFIER_TASK = {"[caption]": "caption", "[vqa]": "vqa", "[refer]": "grounding", "[identify]": "grounding",
                   "[detection]": "grounding"}
STAGE1_TASKS = tuple(TASK_TO_IDENTIFIER)
STAGE2_TASKS = ("conversation",)
STAGE_TASKS = {"stage1": STAGE1_TASKS, "stage2": STAGE2_TASKS}  # the instruction file's tasks per stage

PHRASINGS = {
    "caption": ["Briefly describe this image.", "Describe the image in one sentence.",
                "What does this remote sensing image show?", "Give a short caption for this aerial image."],
    # The object list of a grounding scene ("there are two ships ... in the image"): its own
    # questions, so that stage 2 does not teach the captioning prompts a second answer style.
    "inventory": ["Which objects can you see in this image?", "List the objects in this image.",
                  "What objects does this scene contain?"],
    "video_caption": ["describe the video frame image", "Describe what happens in this UAV video.",
                      "Give a short caption for this drone clip."],
    # a clip's event class (CapERA's ERA event), asked in stage-2 clip conversations, as ERA-VQA asks
    "event_vqa": ["What event is happening in this video?", "Which event does this UAV clip show?",
                  "What is going on in this drone video?"],
    "scene_vqa": ["Which scene category does this image belong to?", "What type of scene is shown in this image?",
                  "Classify the land use of this image."],
    "refer": ["{expression}", "where is {expression}?", "give me the location of {expression}"],
    "identify": ["{box}", "what object is in {box}?", "describe the object in {box}"],
    "detection": ["{phrase}", "find every {singular} in the image", "where are the {phrase}?"],
}


def task_of(question: str) -> str | None:
    """The bench task a question asks for: that of its first task identifier (the tokenizer
    reads an identifier wherever it stands); None for free text without one."""
    found = sorted((question.find(i), i) for i in TASK_IDENTIFIERS if i in question)
    return IDENTIFIER_TASK[found[0][1]] if found else None


def pick(task: str, key: str) -> str:
    """A phrasing for `task`, chosen by a stable hash of `key` (same corpus, same text)."""
    options = PHRASINGS[task]
    return options[zlib.crc32(key.encode()) % len(options)]


def first(task: str) -> str:
    return PHRASINGS[task][0]
