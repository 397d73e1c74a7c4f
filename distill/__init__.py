"""The objective: every distillation loss as a pure function, and the student's initialisation from the teacher.

Owns the logit losses (`logits/`), feature and attention matching (`features`, `attention`), the layer mapping
(`mapping`) and EPLB (`eplb`), the cross-tokenizer losses (`cross_tokenizer`: ALM chunk-likelihood matching
and the shared-vocabulary KL), the temperature schedule (`temperature`), Minitron pruning (`student_init`), the
objective's config section (`config`) and how they combine (`objective`). Imports `models` only, never `vishwam`.
"""
