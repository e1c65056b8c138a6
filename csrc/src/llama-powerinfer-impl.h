// powerinfer_gguf: internal declarations shared by our additions (not part of the public API).
#pragma once

#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-powerinfer.h"

#include <string>
#include <vector>

struct llama_model_loader;
struct llama_layer;
struct llama_model_base;
struct llama_model;

// powerinfer_gguf/format.py: the key names, written once on the C++ side
#define LLAMA_PI_FORMAT_VERSION       1
#define LLAMA_PI_KEY_FORMAT_VERSION   "powerinfer.format_version"
#define LLAMA_PI_KEY_SPARSE           "powerinfer.sparse"
#define LLAMA_PI_KEY_FFN_DOWN_LAYOUT  "powerinfer.ffn_down_layout"
#define LLAMA_PI_KEY_PREDICTOR_ACT    "powerinfer.predictor.act"
#define LLAMA_PI_KEY_PREDICTOR_RECALL "powerinfer.predictor.recall"     // float32[n_layer], held-out
#define LLAMA_PI_KEY_PREDICTOR_PRECISION "powerinfer.predictor.precision" // float32[n_layer], held-out

// run-time choices: not written in files, given as kv overrides (llama_model_params.kv_overrides)
#define LLAMA_PI_KEY_RT_SPARSE        "powerinfer.runtime.sparse"            // bool, default true
#define LLAMA_PI_KEY_RT_ALL_ACTIVE    "powerinfer.runtime.all_active"        // bool, default false
#define LLAMA_PI_KEY_RT_WAY           "powerinfer.runtime.ffn_way"           // str: auto (default), pairs, tiles, dense
#define LLAMA_PI_KEY_RT_VRAM_BUDGET   "powerinfer.runtime.vram_budget"       // int bytes; -1 = free VRAM less a margin
#define LLAMA_PI_KEY_RT_VRAM_CTX      "powerinfer.runtime.vram_ctx"          // int, context the KV reserve is sized for
#define LLAMA_PI_KEY_RT_DEV_ROWS      "powerinfer.runtime.dev_rows"          // int: force every layer's split (tests)
#define LLAMA_PI_KEY_RT_VRAM_RESERVE  "powerinfer.runtime.vram_reserve"      // int bytes for compute buffers (default: estimated)
#define LLAMA_PI_KEY_RT_SPLIT_COST_US "powerinfer.runtime.split_cost_us"     // int, per-layer CPU hand-off cost, default 70
#define LLAMA_PI_KEY_RT_PLAN_NO_GPU   "powerinfer.runtime.plan_without_gpu"  // bool: plan a budget with no GPU (tests)
#define LLAMA_PI_KEY_RT_DEVICE_BUDGETS "powerinfer.runtime.device_budgets"   // str "NAME=BYTES,..." (-1: auto): a budget per device

// FFN activations of LLaMA-family models (powerinfer_gguf/format.py ACTIVATIONS).
enum llama_pi_act : uint32_t {
    LLAMA_PI_ACT_SILU  = 0, // SwiGLU: silu(gate x) * (up x)          (upstream llama)
    LLAMA_PI_ACT_RELU  = 1, // ReGLU:  relu(gate x) * (up x)          (ReluLLaMA, ProSparse)
    LLAMA_PI_ACT_DRELU = 2, // dReLU:  relu(gate x) * relu(up x)      (TurboSparse)
};

// How each part of a sparse FFN runs (powerinfer.runtime.ffn_way; docs/DESIGN.md, "ways"). Auto:
// chosen per ubatch and part (llama-powerinfer-graph.cpp, and the CPU kernel between pairs and
// tiles); the others force one way everywhere, for tests and measurements.
enum llama_pi_way : uint32_t {
    LLAMA_PI_WAY_AUTO  = 0,
    LLAMA_PI_WAY_PAIRS = 1, // the sparse op, one dot product per selected (row, token)
    LLAMA_PI_WAY_TILES = 2, // the sparse op, the selected rows' union against all tokens in register tiles
    LLAMA_PI_WAY_DENSE = 3, // GEMMs over all rows, masked by the selection
};

// A large ubatch's dense GPU FFN over rows in CPU memory runs in chunks of this many rows, so its
// staging in VRAM (two chunks' rows: the next one's cross the bus during this one's GEMMs) is
// bounded by chunks, not a layer: what it leaves to hot rows is what decode runs on. Two chunks of
// 2048 hold what one of 4096 did before the copy stream; a 2048 x 5120 x 512 GEMM still keeps an
// H200 busy (13B: ~27 us at 400 TFLOP/s).
constexpr int64_t LLAMA_PI_GPU_CHUNK_ROWS = 2048;

// A chunk whose rows a ubatch is expected to select at least this share of is copied whole by the
// GPU's copy engine rather than gathered (its SMs reading only the selected rows): on the H200
// host, gathering 90% of a 13B gate's rows took 0.97x the whole copy's time, 100% 1.08x
// (docs/NOTES.md, test-pi-sparse-ffn --perf).
constexpr double LLAMA_PI_GATHER_MAX_SHARE = 0.92;

// Nodes our FFN adds to a graph beyond the 8 per model tensor llama.cpp counts: a sparse file's
// dense GPU way builds ~30 per chunk of a part. 0 for any other file.
uint32_t llama_pi_graph_extra_nodes(const llama_model & model);

// Room for the few metadata-only tensors that ask a backend about an op (none joins a graph: a
// graph's context is sized for its nodes)
struct llama_pi_probe_ctx {
    ggml_context * ctx;
    llama_pi_probe_ctx() : ctx(ggml_init({ 8 * ggml_tensor_overhead(), nullptr, true })) {}
    ~llama_pi_probe_ctx() { ggml_free(ctx); }
};

// Reads `<arch>.hidden_activation` into hparams.pi.ffn_act; absent means SiLU. An activation we
// do not know fails the load with a message naming it (never a silent SiLU).
void llama_pi_load_ffn_act(llama_model_loader & ml, llama_hparams & hparams);

// Reads and checks our `powerinfer.*` keys (docs/FORMAT.md); sets hparams.pi.sparse when the file
// carries the sparse layout. A file without them is untouched. Bad values fail the load by name.
void llama_pi_load_meta(llama_model_loader & ml, llama_hparams & hparams);

// A run-time int / bool key: a kv override of that name wins, then the file's key, else def.
int64_t     llama_pi_runtime_int(const llama_model_loader & ml, const char * key, int64_t def);
bool        llama_pi_runtime_bool(const llama_model_loader & ml, const char * key, bool def);
std::string llama_pi_runtime_str(const llama_model_loader & ml, const char * key, const char * def);

// What a device is. Every RPC device calls itself a GPU (llama.cpp gives layers to GPUs only);
// its server says what it is (patches/0008): a remote CPU runs the sparse op as the local one does.
enum ggml_backend_dev_type llama_pi_dev_kind(ggml_backend_dev_t dev);
bool llama_pi_dev_is_gpu(ggml_backend_dev_t dev);

// Placement under a VRAM budget (llama-powerinfer-placement.cpp). Runs in load_tensors before any
// buffer is made: reads each layer's neuron frequencies from the file, decides how many layers run
// on the GPU (attention, KV, predictor: read whole every token) and, for those, how many of the
// hottest FFN rows join them (the rest stay in CPU memory), fills hparams.pi.dev_rows and logs the
// decision. Returns the n_gpu_layers to use: the caller's unless a budget was given. An impossible
// budget fails the load with a message saying what fits.
int llama_pi_plan_placement(llama_model_base & model, llama_model_loader & ml, int n_gpu_layers);

// Load mode "auto" (llama.cpp's default: mmap) for a sparse file on a machine whose discrete GPU
// has pinned host memory: no mmap. Mapped, llama.cpp keeps CPU-resident weights in the file's
// pageable pages instead of that pinned memory, and a large ubatch's rows then cross the bus 6x
// slower (13B at 10 GiB: pp512 ~230 t/s against ~1300: docs/NOTES.md); stock's -ot pays the same
// (llama.cpp warns of it there). Decode loses nothing: our CPU buffers get 2 MB pages only when not
// mapped. A file larger than RAM then needs an explicit mmap load mode.
void llama_pi_auto_load_mode(const llama_model_base & model, llama_model_loader & ml);

// Splits the file tensor `name` along its last dimension at `rows`: the loader then knows `name` as
// rows [0, rows) and `cold_name` as the rest, both read from the file's bytes (no copy).
void llama_pi_split_weight(llama_model_loader & ml, const std::string & name, const std::string & cold_name, int64_t rows);

// Creates layer il's down_t and predictor tensors (instead of ffn_down), after gate and up: checks every
// shape against the hyperparameters (the predictor rank is read from the file and must be sane),
// every type against what the kernels read, and that the layer has no FFN biases.
void llama_pi_create_layer_tensors(llama_model_base & model, llama_layer & layer, int il);

// After the weights are loaded: each part's counters (llama_pi_layer::counters), zeroed, in a
// buffer of the type that holds its rows (CPU memory for rows in host memory), so that the
// backend running the part's op adds to them where they lie; and each part's copy_all_from.
void llama_pi_loaded(llama_model_base & model);

// The dense gated FFN of layer il with hparams.pi.ffn_act. The one place a llama-family graph
// builds its FFN: the sparse FFN branches off here (and may read the next layer's rows ahead).
ggml_tensor * llama_pi_build_ffn(const llm_graph_context & g, ggml_tensor * cur, const llama_model & model, int il);

// The planner's answer (llama-powerinfer-plan.cpp); llama_pi_plan() is its C face.
struct llama_pi_plan_result {
    int     n_gpu_layers = -1; // llama.cpp's count: output = 1, then layers from the last; -1: the output does not fit
    int     n_layers_gpu = 0;  // whole layers (attention, KV, predictor) on the GPU
    int64_t fixed_bytes  = 0;  // their bytes and the output layer's
    int64_t rows_bytes   = 0;  // bytes of the hot rows
    double  mass_share   = 0;  // of the GPU layers' activation mass, the share their hot rows carry
    std::vector<int64_t> dev_rows; // per layer: rows with the layer on its device
};
llama_pi_plan_result llama_pi_plan_layers(const llama_pi_plan_layer * layers, int n_layer, const llama_pi_plan_params & p);

// "auto": what a GPU has free, less a margin for the driver and fragmentation (512 MiB + 2% of its total).
int64_t llama_pi_auto_budget(size_t free, size_t total);
