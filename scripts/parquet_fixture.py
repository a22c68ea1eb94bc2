"""Writes the Parquet fixtures strata's data tests read (tests/fixtures/parquet/), with pyarrow as
Hugging Face `datasets` writes them: one file per chat-like format and one of raw text, each with
another page compression, nested columns as list<struct>. The JSON beside each file holds the same
rows, so the test checks that strata reads the Parquet exactly as the JSON.

    python3 -m pip install pyarrow && python3 scripts/parquet_fixture.py
"""
import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parquet"
OUT.mkdir(parents=True, exist_ok=True)

sets = {
    "alpaca": ("snappy", [
        {"instruction": "Name the account type.", "input": "Cash in a drawer", "output": "An asset account.",
         "system": "Answer briefly.", "history": [["What is a ledger?", "A book of accounts."]]},
        {"instruction": "Define equity.", "input": "", "output": "Assets minus liabilities.",
         "system": "", "history": []},
    ]),
    "sharegpt": ("zstd", [
        {"conversations": [{"from": "human", "value": "What is a debit?"},
                           {"from": "gpt", "value": "An entry on the left side."}], "system": "Be exact."},
        {"conversations": [{"from": "human", "value": "And a credit?"},
                           {"from": "gpt", "value": "The right side. \u00e9\u00e8 \u4e2d"}], "system": ""},
    ]),
    "text": ("gzip", [
        {"text": "A reconciliation compares two sets of records."},
        {"text": "Double-entry bookkeeping records every transaction twice."},
        {"text": "The trial balance lists every account and its balance."},
    ]),
    "prompt_completion": ("lz4", [
        {"prompt": "Two plus two?", "completion": "Four."},
    ]),
}
for name, (codec, rows) in sets.items():
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, OUT / f"{name}.parquet", compression=codec)
    (OUT / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT / (name + '.parquet')} ({codec}, {len(rows)} rows)")
