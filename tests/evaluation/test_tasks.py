"""Task definitions: prompts equal the official strings, the VQA extraction's quirks."""

from __future__ import annotations

import json

import pytest

from mmlayers.evaluation import (
    IMAGE,
    TASKS,
    coco_captions_items,
    extract_vqa_answer,
    get_task,
    read_task_items,
    render_prompt,
    visdial_prompt,
)

SOI = "<soi><image><image>"


def official_text(pieces):
    """Join rendered pieces as the official collator's string would read."""
    return " ".join(pieces).replace(f"{IMAGE} ", IMAGE).replace(IMAGE, SOI)


def test_prompts_equal_the_official_strings():
    assert official_text(render_prompt(get_task("coco_caption"))) == f"{SOI}a photo of"
    assert official_text(render_prompt(get_task("image2paragraph"))) == (
        f"{SOI}Please describe the image in detail. The image depicts")
    got = official_text(render_prompt(get_task("vqav2"), question="What is it?"))
    assert got == (f"Based on the image, please answer the question. {SOI}What is it? Please "
                   "provide an accurate answer within one word. The answer is:")
    assert "respond with 'Unanswerable'" in render_prompt(get_task("vizwiz"), question="q")[2]
    assert render_prompt(get_task("coco_t2i"), caption=" a dog ") == ["a dog", IMAGE]


def test_official_generation_settings():
    cap, vqa = get_task("flickr30k").text, get_task("okvqa").text
    assert (cap.max_new_tokens, cap.min_length, cap.num_beams) == (20, 8, 5)
    assert (vqa.max_new_tokens, vqa.num_beams, vqa.length_penalty) == (10, 3, 0.0)
    para = get_task("image2paragraph").text
    assert (para.max_new_tokens, para.min_length, para.repetition_penalty) == (90, 90, 1.2)
    t2i = get_task("coco_t2i").image
    assert (t2i.guidance_scale, t2i.num_inference_steps, t2i.num_candidates) == (3.5, 250, 8)
    assert get_task("lncoco").image.num_candidates == 1
    assert get_task("vizwiz").vqa_style == "vizwiz"
    assert set(TASKS) == {"coco_caption", "flickr30k", "nocaps", "image2paragraph", "vqav2",
                          "okvqa", "vizwiz", "textvqa", "visdial", "coco_t2i", "lncoco"}
    with pytest.raises(ValueError, match="known tasks"):
        get_task("gqa")
    with pytest.raises(ValueError, match="question"):
        render_prompt(get_task("vqav2"))


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Two", "two"),  # numbers are left to vqa_accuracy's normalisation
        ('"Yes", it is.', "yes"),
        ("The color is blue.", "blue"),
        ("banana split", "split"),  # "a " matches inside "banana split"
        ("A banana split", "banan"),  # ... and the text between two matches is kept
        ("a cup of tea", "cup"),
        ("red or blue", "red"),
        ("cats and dogs\nmore", "cats"),
        ("", ""),
    ],
)
def test_extract_vqa_answer(text, answer):
    assert extract_vqa_answer(text) == answer


def test_visdial_history_quirk():
    d = [("q1", "a1"), ("q2", "a2"), ("q3", "a3"), ("q4", "a4")]
    ctx, q = visdial_prompt("cap", d, 4)
    assert ctx == "caption: cap. question: q1? answer: a1. question: q2? answer: a2. " \
                  "question: q4? answer:" and q == "q4"
    full, _ = visdial_prompt("cap", d, 4, official=False)
    assert "question: q3? answer: a3. question: q4? answer:" in full
    assert visdial_prompt("cap", d, 1)[0] == "caption: cap. question: q1? answer:"
    with pytest.raises(ValueError, match="round_index"):
        visdial_prompt("cap", d, 5)


def test_reader_checks_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.json not found.*expected"):
        read_task_items(tmp_path, "vqav2", "vqa")
    folder = tmp_path / "vqav2"
    folder.mkdir()
    (folder / "annotations.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_task_items(tmp_path, "vqav2", "vqa")
    (folder / "annotations.json").write_text(json.dumps({"items": [{"id": 1, "image": "x.png"}]}))
    with pytest.raises(ValueError, match=r"lacks \['question', 'answers'\]"):
        read_task_items(tmp_path, "vqav2", "vqa")
    item = {"id": 1, "image": "x.png", "question": "q", "answers": ["a"] * 10}
    (folder / "annotations.json").write_text(json.dumps({"items": [item]}))
    with pytest.raises(FileNotFoundError, match="x.png, which is missing"):
        read_task_items(tmp_path, "vqav2", "vqa")
    (folder / "x.png").write_bytes(b"")
    assert read_task_items(tmp_path, "vqav2", "vqa")[0]["image"] == str(folder / "x.png")


def test_coco_format_converter_groups_references():
    data = {"images": [{"id": 5, "file_name": "5.jpg"}, {"id": 6, "file_name": "6.jpg"}],
            "annotations": [{"image_id": 6, "caption": "B"}, {"image_id": 5, "caption": "A"},
                            {"image_id": 6, "caption": "C"}]}
    items = {i["id"]: i for i in coco_captions_items(data)}
    assert items[6]["references"] == ["b", "c"] and items[5]["image"] == "5.jpg"


def _official_fixtures():
    """(task, kind, official files as written on disk, converter) in the real formats."""
    from mmlayers.evaluation import (
        coco_t2i_items,
        karpathy_items,
        lncoco_items,
        paragraph_items,
        visdial_items,
        vizwiz_items,
        vqa_items,
    )

    karpathy = [{"image": "val2014/COCO_val2014_000000000001.jpg",
                 "caption": ["A cat.", "a kitten"]}]
    vqa_q = {"questions": [{"question_id": 11, "image_id": 1, "question": "What?"}]}
    vqa_a = {"annotations": [{"question_id": 11, "image_id": 1, "question_type": "what",
                              "answer_type": "other", "multiple_choice_answer": "cat",
                              "answers": [{"answer": "cat", "answer_confidence": "yes",
                                           "answer_id": k} for k in range(1, 11)]}]}
    vizwiz = [{"image": "VizWiz_val_00000001.jpg", "question": "What?", "answerable": 1,
               "answer_type": "other", "answers": [{"answer": "cat",
                                                    "answer_confidence": "yes"}] * 10}]
    para = {"annotations": [{"image_id": 1, "caption": "A cat. It sleeps.",
                             "url": "https://cs.stanford.edu/VG_100K/1.jpg"}]}
    caps = {"annotations": [{"id": 5, "image_id": 1, "caption": "A Cat"}]}
    visdial = {"data": {"questions": ["is it a cat"], "answers": ["yes", "no"],
                        "dialogs": [{"image_id": 1, "caption": "a cat", "dialog": [
                            {"question": 0, "answer": 0, "answer_options": [0, 1],
                             "gt_index": 0}]}]}}
    dense = [{"image_id": 1, "round_id": 1, "gt_relevance": [1.0, 0.0]}]
    return [
        ("coco_caption", "caption", {"k.json": karpathy}, lambda f: karpathy_items(f["k.json"])),
        ("vqav2", "vqa", {"q.json": vqa_q, "a.json": vqa_a},
         lambda f: vqa_items(f["q.json"], f["a.json"],
                             image_format="val2014/COCO_val2014_{image_id:012d}.jpg")),
        ("vizwiz", "vqa", {"val.json": vizwiz}, lambda f: vizwiz_items(f["val.json"])),
        ("image2paragraph", "caption", {"p.json": para, "s.json": [1]},
         lambda f: paragraph_items(f["p.json"], f["s.json"])),
        ("coco_t2i", "text_to_image", {"c.json": caps}, lambda f: coco_t2i_items(f["c.json"])),
        ("lncoco", "text_to_image", {"l.jsonl": [{"image_id": "1", "caption": "A cat."}]},
         lambda f: lncoco_items(f["l.jsonl"])),
        ("visdial", "visdial", {"v.json": visdial, "d.json": dense},
         lambda f: visdial_items(f["v.json"], f["d.json"])),
    ]


@pytest.mark.parametrize("fixture", _official_fixtures(), ids=lambda f: f[0])
def test_official_files_convert_to_readable_layout(fixture, tmp_path):
    task, kind, files, convert = fixture
    loaded = {}
    for name, content in files.items():  # written and read back in the official format
        path = tmp_path / "official" / name
        path.parent.mkdir(exist_ok=True)
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(x) + "\n" for x in content))
            loaded[name] = [json.loads(x) for x in path.read_text().splitlines()]
        else:
            path.write_text(json.dumps(content))
            loaded[name] = json.loads(path.read_text())
    items = convert(loaded)
    assert len(items) == 1
    folder = tmp_path / "data" / task
    folder.mkdir(parents=True)
    if "image" in items[0]:
        (folder / items[0]["image"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / items[0]["image"]).write_bytes(b"")
    (folder / "annotations.json").write_text(json.dumps({"task": task, "items": items}))
    got = read_task_items(tmp_path / "data", task, kind)[0]
    assert got["id"] == items[0]["id"]
    if kind == "vqa":
        assert got["answers"] == ["cat"] * 10
    if kind == "visdial":
        assert got["options"] == ["yes", "no"] and got["relevance"] == [1.0, 0.0]
