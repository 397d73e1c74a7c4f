"""Cross-tokenizer data: a teacher and a student with different tokenizers, aligned on the bytes of the text.

- `alignment`: byte spans of each token, the coarsest common segmentation into chunks, the shared vocabulary,
  per-id byte tables.
- `windows`: both sides' streams of text documents and the static-shape windows cut from them (`CrossDataset`).
- `chat`: chat rows rendered by each side's own template, aligned on the messages' contents.
- `streams`: a token store unit's arrays for a cross-tokenizer run (text or chat rows).
- `vocab_transfer`: FVT, a student vocabulary's embeddings from the teacher's.

Imports `numpy`, `tokenizers`, `vishwam.errors` and the one-tokenizer data modules (`vishwam.data.chat`,
`chat_rows`, `text`).
"""
