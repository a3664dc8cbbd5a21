# Tiny CPU ladder, stage 2: grows stage 1 on every axis at once (depth, heads, FFN, vocabulary) to 181,584 parameters.
out_dir = "out/tiny_stage2"
init_from = "grow"
grow_from = "out/tiny_stage1/ckpt.pt"
data_dir = "data/tinyshakespeare/llama2_v1024"
vocab_size = 1024
n_layer, n_head, head_dim, ffn_hidden, block_size = 3, 3, 16, 128, 64
batch_size = 16
max_iters = 150
learning_rate, min_lr, warmup_iters = 3e-3, 3e-4, 10  # WSD: warm up, then hold
eval_interval, eval_windows, log_interval = 50, 128, 10
