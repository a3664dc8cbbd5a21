# Scratch baseline: the ladder's final shape (stage 7, Llama 2 7B) trained from scratch,
# for the same number of iterations as the whole ladder. Needs FSDP (issue: parallelism).
out_dir = "out/scratch"
data_dir = "data/gutenberg/llama2_v32000"
vocab_size = 32000
n_layer, n_head, head_dim, ffn_hidden, block_size = 32, 32, 128, 11008, 2048
batch_size, grad_accum_steps = 2, 128  # as stage 7
max_iters = 14000
learning_rate, min_lr, warmup_iters = 3e-4, 3e-5, 100
cooldown_iters = 2800  # WSD with a 20% cooldown, as the study's scratch runs
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
parallelism = "fsdp"
