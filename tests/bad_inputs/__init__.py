"""Bad-input reliability harness: bad (and a few good) command lines against every installed
adjq command, each classified (clean run, one-line error, multi-line, traceback, timeout,
wrong, skipped; :mod:`.outcomes`).

    python -m tests.bad_inputs --work WORKDIR            # all cases (trains small fixtures)
    python -m tests.bad_inputs --work WORKDIR --fast     # the ones the test suite runs
    python -m tests.bad_inputs --list                    # the cases, without running them

The cases are tables (:mod:`.cases`); the commands are the console scripts found next to
the interpreter or on PATH (:mod:`.commands`); fixtures are made once per work directory
(:mod:`.fixtures`); tests/test_bad_inputs.py runs the fast cases.
"""
