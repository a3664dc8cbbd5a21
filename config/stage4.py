# Ladder stage 4: 20 layers, 10 heads of 128 (d=1280), FFN 3584, vocabulary 32000.
# `python model.py config/stage*.py` prints every stage's parameters and FLOPs per token.
out_dir = "out/stage4"
init_from = "grow"
grow_from = "out/stage3/ckpt.pt"
data_dir = "data/gutenberg/llama2_v32000"
vocab_size = 32000
n_layer, n_head, head_dim, ffn_hidden, block_size = 20, 10, 128, 3584, 2048
batch_size, grad_accum_steps = 8, 32  # 0.5M tokens per iteration on 8 GPUs or 1 (accumulating)
max_iters = 800
learning_rate, min_lr, warmup_iters = 3e-04, 3e-05, 100  # WSD: warm up, then hold (README, Does growing pay?)
lr_mult = 2.0  # the new generation at twice the peak of the old ones: part of the study's best recipe
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
