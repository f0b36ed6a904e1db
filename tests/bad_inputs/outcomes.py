"""What a finished command did: its outcome class and the message that goes with it.

Outcomes:

* ``clean-run``   exit 0 and no traceback;
* ``one-line``    non-zero exit, no traceback, exactly one meaningful stderr line, an error line;
* ``multi-line``  non-zero exit, no traceback, otherwise (several lines, or none);
* ``traceback``   a "Traceback" in stdout or stderr, or a crash (signal, abort, fatal error);
* ``timeout``     killed after the case's time limit;
* ``wrong``       the case has an expectation (the NaN guard keeps no non-finite checkpoint,
                  divergence must stop the run, the documented single-stage command must
                  work, a changed config must be refused, ...) and the run contradicts it,
                  without a traceback or a timeout (for those the failed expectation is
                  added as a note);
* ``skipped``     the case could not be set up on this machine (said why).

"Meaningful" stderr lines are the non-blank ones that are not known TensorFlow / absl /
TFLite log noise, tqdm progress frames, or the old-form ``quantizer.py`` "note: old form"
line. For a traceback the message is the exception line (the last one), not
"Traceback (most recent call last):".
"""

from __future__ import annotations

import dataclasses
import re

OUTCOMES = ("clean-run", "one-line", "multi-line", "traceback", "timeout", "wrong", "skipped")

NOISE = [re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"^[IWEF]\d{4} [\d:.]+\s+\d+\s+\S+:\d+\]",          # absl C++ log
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ",               # TF C++ log
    r"oneDNN custom operations are on",
    r"This TensorFlow binary is optimized",
    r"To enable the following instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning",
    r"^(WARNING|INFO):(absl|tensorflow):",                          # Python TF/absl logging
    r"^INFO: Created TensorFlow Lite",                              # TFLite delegate
    r"^INFO: Initialized TensorFlow Lite runtime",
    r"\d+%\|.*\|",                                                  # tqdm frames
    r"\d+it \[\d",
    r"^note: old form; same as",                                    # quantizer.py's note
)]
ERROR_LINE = re.compile(r"^(error\b|\S+: error\b|fatal\b)", re.I)
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")
CRASH_MARKERS = ("Fatal Python error", "Segmentation fault", "core dumped", "Check failed:",
                 "terminate called")


def meaningful_lines(text: str) -> list[str]:
    lines = []
    for raw in re.split(r"[\r\n]", text):
        line = raw.strip()
        if line and not any(p.search(line) for p in NOISE):
            lines.append(line)
    return lines


@dataclasses.dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool = False
    skipped: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def classify(res: Result) -> tuple[str, str]:
    """``(outcome, message)`` of a finished command, before any expectation."""
    if res.skipped:
        return "skipped", res.skipped
    lines = meaningful_lines(res.stderr)
    both = res.stdout + "\n" + res.stderr
    if res.timed_out:
        return "timeout", (lines[-1] if lines else "")
    crashed = (res.rc is not None and (res.rc < 0 or res.rc in (134, 136, 139))) or any(
        m in both for m in CRASH_MARKERS)
    if "Traceback (most recent call last)" in both or crashed:
        exc = [ln for ln in meaningful_lines(both) if EXCEPTION_LINE.match(ln)]
        msg = exc[-1] if exc else (lines[-1] if lines else "")
        msg = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg)   # TF's op wrapper names
        msg = re.sub(r"^(?:[a-z_]\w*\.)+(?=[A-Z])", "", msg)           # module path of the class
        if res.rc is not None and res.rc < 0:
            msg = f"killed by signal {-res.rc}; {msg}"
        return "traceback", msg
    if res.rc == 0:
        return "clean-run", (lines[0] if lines else "")
    if len(lines) == 1 and ERROR_LINE.match(lines[0]):
        return "one-line", lines[0]
    if not lines:
        return "multi-line", f"(exit {res.rc}, no message on stderr)"
    return "multi-line", f"({len(lines)} lines) " + lines[0]
