#!/bin/bash
# One node's share of a training job, for SLURM and HTCondor alike.
# usage: train_node.sh ACCELERATE_CONFIG TRAIN_CONFIG [--set k=v ...]
# Always resumes (train.resume=latest), so a requeued or restarted job continues exactly.
# SIGTERM from the scheduler is forwarded to the training processes only (not to
# accelerate's launcher, which would kill them after 30 s): they finish the optimizer step,
# write checkpoint-N and exit; this script then exits 85 (controlnet-emo's preempted code).
set -u
accel_config=$1; train_config=$2; shift 2
preempted=0
setsid accelerate launch --config_file "$accel_config" \
  --num_machines "${NUM_MACHINES:-1}" --machine_rank "${MACHINE_RANK:-0}" \
  --main_process_ip "${MAIN_ADDR:-127.0.0.1}" --main_process_port "${MAIN_PORT:-29500}" \
  train_controlnet.py --config "$train_config" --set train.resume=latest "$@" &
launcher=$!
trap 'preempted=1; pkill -TERM -P "$launcher"' TERM
wait "$launcher"; rc=$?
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; rc=$?; done
if [ "$preempted" = 1 ] || [ "$rc" = 85 ]; then exit 85; fi
exit "$rc"
