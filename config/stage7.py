# Ladder stage 7: 32 layers, 32 heads of 128 (d=4096), FFN 11008, vocabulary 32000.
# `python model.py config/stage*.py` prints every stage's parameters and FLOPs per token.
out_dir = "out/stage7"
init_from = "grow"
grow_from = "out/stage6/ckpt.pt"
data_dir = "data/gutenberg/llama2_v32000"
vocab_size = 32000
n_layer, n_head, head_dim, ffn_hidden, block_size = 32, 32, 128, 11008, 2048
batch_size, grad_accum_steps = 2, 128  # 0.5M tokens per iteration; micro-batch for 8 GPUs of 80 GB (estimated from one-GPU runs: README, FSDP)
max_iters = 8400  # 60% of the ladder's tokens (stage1.py)
learning_rate, min_lr, warmup_iters = 3e-04, 3e-05, 100  # WSD: warm up, then hold (README, Does growing pay?)
lr_mult = 2.0  # the new generation at twice the peak of the old ones: part of the study's best recipe
cooldown_iters = 1680  # 20%: the last stage cools every generation down; to stop earlier, branch a cooldown
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
parallelism = "fsdp"  # weights, gradients and AdamW state sharded over the GPUs
