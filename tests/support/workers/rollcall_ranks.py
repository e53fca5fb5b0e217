"""The roll call on 3 real ranks: first every rank leaves on an error of its own (nobody is lost),
then rank 2 freezes (SIGSTOP) and ranks 0 and 1 name it. Rank 0 then ends the frozen rank, so
the launcher ends the job (non-zero); the ranks' verdicts are printed as VERDICT lines."""
import os
import signal
import time

import horovod.torch as hvd

from ssd_allreduce.comm import make_communicator
from ssd_allreduce.train.rollcall import RollCall

hvd.init()
comm = make_communicator("horovod")

everyone_leaves = RollCall.start(comm, lambda: "step 7 (a window in flight)")
comm.allgather_object(None)
everyone_leaves.leave("ValueError")
print(f"VERDICT leaving {comm.rank} {everyone_leaves.lost()!r}", flush=True)
comm.allgather_object(None)

one_freezes = RollCall.start(comm, lambda: f"step {12 + comm.rank}")
time.sleep(1.5)   # a beat of each rank after the first
comm.allgather_object(None)
if comm.rank == 2:
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(0.2)
print(f"VERDICT frozen {comm.rank} {one_freezes.lost()!r}", flush=True)
if comm.rank == 0:   # rank 0 answered until rank 1 had its verdict
    os.kill(one_freezes.peers[2][1], signal.SIGKILL)
os._exit(0)   # Horovod's shutdown would wait for the frozen rank
