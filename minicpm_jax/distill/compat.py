"""Student/teacher compatibility, checked before any compute (spec/opd.md 10.1, 10.4): the log-ratio
reward is only unbiased when both models read the identical token ids, so the vocabulary size (config
value), the tokenizer, the chat template and the EOS set must agree."""

from __future__ import annotations

PROBES = ("47+38: 40+30=70", "copy: qmxra -> qmxra", "Hello, world!\n  tabs\tand ünïcode 你好")


def check_compatible(student_cfg, teacher_cfg, student_tok, teacher_tok) -> None:
    """One ``ValueError`` naming every difference between student and teacher."""
    problems = []
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        problems.append(f"vocab_size: student {student_cfg.vocab_size} vs teacher {teacher_cfg.vocab_size}")
    if student_tok.vocab_size != teacher_tok.vocab_size:
        problems.append(f"tokenizer vocabulary: student {student_tok.vocab_size} vs teacher {teacher_tok.vocab_size}")
    else:
        for text in PROBES:  # same ids, and the student's ids survive a round trip through the teacher's
            s, t = student_tok.encode(text, add_bos=False), teacher_tok.encode(text, add_bos=False)
            back = teacher_tok.encode(student_tok.decode(s), add_bos=False)
            if s != t or back != s:
                problems.append(f"tokenizer: {text!r} encodes to {s[:8]}... (student) vs {t[:8]}... (teacher)")
                break
    if sorted(student_tok.stop_ids) != sorted(teacher_tok.stop_ids):
        problems.append(f"EOS set: student {sorted(student_tok.stop_ids)} vs teacher {sorted(teacher_tok.stop_ids)}")
    if (student_tok.chat_template or "") != (teacher_tok.chat_template or ""):
        problems.append("chat template: student and teacher templates differ")
    if problems:
        raise ValueError("distill: student and teacher are not compatible: " + "; ".join(problems))
