# Ladder stage 6: 32 layers, 20 heads of 128 (d=2560), FFN 6912, vocabulary 32000.
# `python model.py config/stage*.py` prints every stage's parameters and FLOPs per token.
out_dir = "out/stage6"
init_from = "grow"
grow_from = "out/stage5/ckpt.pt"
data_dir = "data/gutenberg/llama2_v32000"
vocab_size = 32000
n_layer, n_head, head_dim, ffn_hidden, block_size = 32, 20, 128, 6912, 2048
batch_size, grad_accum_steps = 4, 64  # 0.5M tokens per iteration; micro-batch for 8 GPUs of 80 GB (estimated from one-GPU runs: README, FSDP)
max_iters = 1600
learning_rate, min_lr, warmup_iters = 3e-04, 3e-05, 100  # WSD: warm up, then hold (README, Does growing pay?)
lr_mult = 2.0  # the new generation at twice the peak of the old ones: part of the study's best recipe
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
parallelism = "fsdp"  # weights, gradients and AdamW state sharded over the GPUs
