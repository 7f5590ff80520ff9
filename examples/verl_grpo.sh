#!/usr/bin/env bash
# GRPO on GSM8K with verl, the policy held near its initial checkpoint by a vocabmetric
# penalty instead of verl's sampled-token KL: loss = PPO + β·agg_t D(π_θ(·|x<t), π_ref(·|x<t)).
# See docs/verl.md. NOT yet run end to end on a GPU (see "What was run" there).
#
#   MODEL=/models/Qwen2.5-0.5B-Instruct STORE=runs/qwen-metric/metric.zarr \
#   DATA=$HOME/data/gsm8k bash examples/verl_grpo.sh [more hydra overrides]
#
# Needs: pip install 'vocabmetric[verl]' vllm (a CUDA torch); a store built for MODEL's
# tokenizer (examples/verl_store.toml); GSM8K parquet files from verl's
# examples/data_preprocess/gsm8k.py. GPUs: ACTOR_GPUS for the actor + rollout, and
# TEACHER_GPUS more for the reference (verl serves it as a distillation teacher in its own pool).
set -euo pipefail
: "${MODEL:?set MODEL to the model directory}" "${STORE:?set STORE to the vocabmetric store}"
DATA=${DATA:-$HOME/data/gsm8k}
PENALTY=${PENALTY:-vocabmetric_tree}          # or vocabmetric_sinkhorn, vocabmetric_sliced
PENALTY_KWARGS=${PENALTY_KWARGS:-"{}"}        # e.g. "{eps:0.05,support:64}" for sinkhorn
BETA=${BETA:-0.05}
TOPK=${TOPK:-64}
ACTOR_GPUS=${ACTOR_GPUS:-1}
TEACHER_GPUS=${TEACHER_GPUS:-1}

python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=False \
  data.train_files="$DATA/train.parquet" \
  data.val_files="$DATA/test.parquet" \
  data.train_batch_size=32 \
  data.max_prompt_length=512 \
  data.max_response_length=512 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.use_fused_kernels=False \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=5 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
  distillation.enabled=True \
  distillation.n_gpus_per_node="$TEACHER_GPUS" \
  distillation.nnodes=1 \
  distillation.teacher_models.teacher_model.model_path="$MODEL" \
  distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=1 \
  distillation.distillation_loss._target_=vocabmetric.integrations.verl.VocabMetricLossConfig \
  distillation.distillation_loss.loss_mode="$PENALTY" \
  distillation.distillation_loss.topk="$TOPK" \
  distillation.distillation_loss.use_task_rewards=True \
  distillation.distillation_loss.use_policy_gradient=False \
  distillation.distillation_loss.distillation_loss_coef="$BETA" \
  distillation.distillation_loss.loss_max_clamp=null \
  distillation.distillation_loss.log_prob_min_clamp=null \
  +distillation.distillation_loss.metric_store="$STORE" \
  +distillation.distillation_loss.penalty_kwargs="$PENALTY_KWARGS" \
  '+distillation.distillation_loss.tokenizer_path=${actor_rollout_ref.model.path}' \
  '+distillation.distillation_loss.rollout_temperature=${actor_rollout_ref.rollout.temperature}' \
  trainer.n_gpus_per_node="$ACTOR_GPUS" \
  trainer.nnodes=1 \
  trainer.total_epochs=1 \
  trainer.logger='["console"]' \
  trainer.project_name=vocabmetric_verl \
  trainer.experiment_name="grpo_${PENALTY}" \
  "$@"
