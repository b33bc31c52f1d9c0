"""What the demo shows of a job's log, and the run name that makes a second demo train again."""

from musiclora.demo import JobEcho, fresh_run_name

# `ray job submit` output of a Ray Train job, as captured from Ray 2.60 with Train V2's print patch on
# (each worker print arrives twice, its prefix in colour codes)
JOB_LOG = """\
Job 'raysubmit_x' submitted successfully
\x1b[36m(RayTrainWorker pid=19683)\x1b[0m [musiclora] step 1/2 loss 1.0
\x1b[36m(RayTrainWorker pid=19683)\x1b[0m [musiclora] step 2/2 loss 0.5
\x1b[36m(RayTrainWorker pid=19683)\x1b[0m [musiclora] step 1/2 loss 1.0
\x1b[36m(RayTrainWorker pid=19683)\x1b[0m [musiclora] step 2/2 loss 0.5
(TrainController pid=19600) INFO worker group started
MUSICLORA_RESULT {}
Job 'raysubmit_x' succeeded
"""


def test_each_progress_line_is_shown_once_as_plain_text():
    echo = JobEcho()
    shown = [s for s in (echo.show(line) for line in JOB_LOG.splitlines(keepends=True)) if s is not None]
    assert shown == ["(RayTrainWorker pid=19683) [musiclora] step 1/2 loss 1.0",
                     "(RayTrainWorker pid=19683) [musiclora] step 2/2 loss 0.5",
                     "MUSICLORA_RESULT {}", "Job 'raysubmit_x' succeeded"]
    assert not any("\x1b" in s for s in shown)


def test_each_demo_run_gets_a_fresh_run_name():
    first, second = fresh_run_name("musicgen-melody", 0.0), fresh_run_name("musicgen-melody", 1.0)
    assert first == "musicgen-melody-tiny-demo-19700101-000000" and first != second
