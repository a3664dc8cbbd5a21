# Ladder stage 3: 16 layers, 8 heads of 128 (d=1024), FFN 2816, vocabulary 16384.
# `python model.py config/stage*.py` prints every stage's parameters and FLOPs per token.
out_dir = "out/stage3"
init_from = "grow"
grow_from = "out/stage2/ckpt.pt"
data_dir = "data/gutenberg/llama2_v16384"
vocab_size = 16384
n_layer, n_head, head_dim, ffn_hidden, block_size = 16, 8, 128, 2816, 2048
batch_size, grad_accum_steps = 32, 8  # 0.5M tokens per iteration on 8 GPUs or 1 (accumulating); micro-batch 32: fewer launches per token (README, Speed)
max_iters = 800
learning_rate, min_lr, warmup_iters = 6e-04, 6e-05, 100  # WSD: warm up, then hold (README, Does growing pay?)
lr_mult = 2.0  # the new generation at twice the peak of the old ones: part of the study's best recipe
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
