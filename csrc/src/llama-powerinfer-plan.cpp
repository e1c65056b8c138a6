// powerinfer_gguf: the placement planner, a pure function: per-layer costs and a budget in, how
// many layers go to the GPU and how many of each one's FFN rows join it out.
//
// What a token reads decides what the GPU should hold. Attention, KV cache, norms, predictors and
// the output layer are read whole every token: a byte of them in VRAM saves one byte of CPU reads.
// An FFN row j is read only when its neuron is predicted to fire, with frequency f_j: a byte of it
// in VRAM saves f_j bytes. So the plan is greedy by saved CPU bytes per VRAM byte: the output
// layer, then whole layers from the last (llama.cpp's order), then the hottest rows of every
// offloaded layer's FFN. Rows are stored hot to cold, so each layer's share is one row index h.
// Each layer's marginal gain is its frequency curve, non-increasing, so one common cut-off over
// all layers is optimal for the rows; it is found by bisection (microseconds for 80 layers).
#include "llama-powerinfer.h"
#include "llama-powerinfer-impl.h"

#include <algorithm>
#include <cmath>
#include <vector>

static constexpr int64_t PI_ROW_ALIGN = 32;       // split points: whole warps on the GPU, aligned row bytes
static constexpr double  PI_CPU_BYTES_PER_US = 90e3; // host reads (~90 GB/s): what a hand-off is worth

namespace {
// A GPU layer's rows as the plan sees them.
struct pi_rows {
    int     il;
    int64_t n;        // rows
    int64_t row;      // bytes of one row
    bool    gpu;      // the GPU kernels read the row type
    std::vector<float>  mass; // running minimum of the frequencies (non-increasing)
    std::vector<double> tail; // tail[h] = sum of mass[h:], the CPU's share when rows [0, h) are on the GPU
};
}

static pi_rows pi_rows_of(const llama_pi_plan_layer & l, int il) {
    pi_rows r{ il, l.n_rows, (int64_t) l.row_bytes, l.gpu_rows && l.row_bytes && l.n_rows > 0, std::vector<float>(l.n_rows), std::vector<double>(l.n_rows + 1, 0.0) };
    float run = INFINITY;
    for (int64_t j = 0; j < r.n; ++j) {
        const float v = std::isfinite(l.freq[j]) ? std::max(0.0f, l.freq[j]) : 0.0f;
        run = std::min(run, v);
        r.mass[j] = run;
    }
    for (int64_t j = r.n - 1; j >= 0; --j) {
        r.tail[j] = r.tail[j + 1] + r.mass[j];
    }
    return r;
}

// Rows of a layer worth more than tau saved bytes per VRAM byte: the prefix where mass/row > tau.
static int64_t pi_rows_above(const pi_rows & r, double tau) {
    const double f = tau * r.row;
    return std::partition_point(r.mass.begin(), r.mass.end(), [f](float m) { return (double) m > f; }) - r.mass.begin();
}

// Whole layers that fit after the output layer, from the last: k, and the bytes used with them.
static int pi_whole_layers(const llama_pi_plan_layer * layers, int n_layer, const llama_pi_plan_params & p,
                           int64_t & used) {
    int k = 0;
    used = (int64_t) p.output_bytes;
    while (k < n_layer && used + (int64_t) layers[n_layer - 1 - k].base_bytes <= p.avail_bytes) {
        used += layers[n_layer - 1 - k].base_bytes;
        k++;
    }
    if (p.n_gpu_layers_cap >= 0 && p.n_gpu_layers_cap < k + 1) {
        // the caller's cap: fewer layers, their bytes only
        k = std::max(0, p.n_gpu_layers_cap - 1);
        used = p.n_gpu_layers_cap >= 1 ? (int64_t) p.output_bytes : 0;
        for (int i = 0; i < k; ++i) {
            used += layers[n_layer - 1 - i].base_bytes;
        }
    }
    return k;
}

// One frequency cut-off over the layers order[K:], within `left` bytes: each layer's rows above it,
// rounded down to PI_ROW_ALIGN where a layer is split; order[:K] whole. True when every row fits.
static bool pi_cut_rows(const std::vector<pi_rows> & rows, const std::vector<int> & order, size_t K, int64_t left,
                        std::vector<int64_t> & h) {
    auto rows_bytes = [&](double tau) {
        int64_t sum = 0;
        for (size_t i = K; i < order.size(); ++i) {
            sum += pi_rows_above(rows[order[i]], tau) * rows[order[i]].row;
        }
        return sum;
    };
    const bool all_fit = rows_bytes(-1.0) <= left; // tau < 0: every row, zero-frequency ones too
    double lo = 0, hi = 1.0; // tau: saved bytes per VRAM byte
    for (int i : order) {
        hi = std::max(hi, (double) rows[i].mass[0] / rows[i].row + 1);
    }
    for (int it = 0; it < 64 && !all_fit; ++it) {
        const double mid = 0.5 * (lo + hi);
        (rows_bytes(mid) <= left ? hi : lo) = mid;
    }
    for (size_t i = 0; i < order.size(); ++i) {
        const pi_rows & r = rows[order[i]];
        const int64_t n = i < K || all_fit ? r.n : pi_rows_above(r, hi);
        h[order[i]] = n == r.n ? n : n / PI_ROW_ALIGN * PI_ROW_ALIGN;
    }
    return all_fit;
}

// Rows of the GPU layers. A layer with rows left in CPU memory also pays a fixed hand-off per token
// (x and scores down, the partial sum up, two synchronisations, a CPU wake-up), worth split_cost_us
// of CPU reads. So: for K = 0, 1, ... make the K most-active layers whole, share what is left among
// the others by one cut-off, and keep the K with the least expected CPU bytes + hand-offs.
static std::vector<int64_t> pi_plan_rows(const std::vector<pi_rows> & rows, int64_t rem, int64_t split_cost_us) {
    const double split_bytes = (double) split_cost_us * PI_CPU_BYTES_PER_US;
    std::vector<int> order; // layers whose rows the GPU reads, most activation mass first
    for (size_t i = 0; i < rows.size(); ++i) {
        if (rows[i].gpu) {
            order.push_back((int) i);
        }
    }
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return rows[a].tail[0] > rows[b].tail[0]; });
    std::vector<int64_t> best(rows.size(), 0), cur(rows.size(), 0);
    double best_cost = INFINITY;
    int64_t whole_bytes = 0;
    for (size_t K = 0; K <= order.size(); ++K) {
        if (K > 0) {
            whole_bytes += rows[order[K - 1]].n * rows[order[K - 1]].row;
        }
        if (whole_bytes > rem) {
            break;
        }
        const bool all_fit = pi_cut_rows(rows, order, K, rem - whole_bytes, cur);
        double c = 0;
        for (int i : order) {
            c += rows[i].tail[cur[i]] * (double) rows[i].row + (cur[i] < rows[i].n ? split_bytes : 0.0);
        }
        if (c < best_cost) {
            best_cost = c;
            best = cur;
        }
        if (all_fit) {
            break; // more whole layers change nothing
        }
    }
    return best;
}

llama_pi_plan_result llama_pi_plan_layers(const llama_pi_plan_layer * layers, int n_layer, const llama_pi_plan_params & p) {
    llama_pi_plan_result res;
    res.dev_rows.resize(n_layer);
    for (int il = 0; il < n_layer; ++il) {
        res.dev_rows[il] = layers[il].n_rows;
    }
    if ((int64_t) p.output_bytes > p.avail_bytes) {
        return res; // n_gpu_layers = -1: the caller says what would fit
    }
    int64_t used = 0;
    const int k = pi_whole_layers(layers, n_layer, p, used);
    const int first_gpu = n_layer - k;
    res.n_layers_gpu = k;
    res.n_gpu_layers = k + 1;
    if (p.n_gpu_layers_cap >= 0) {
        res.n_gpu_layers = std::min(res.n_gpu_layers, p.n_gpu_layers_cap);
    }
    res.fixed_bytes = used;

    std::vector<pi_rows> rows; // the GPU layers' rows (a type the GPU cannot read stays in CPU memory)
    for (int il = first_gpu; il < n_layer; ++il) {
        rows.push_back(pi_rows_of(layers[il], il));
    }
    const std::vector<int64_t> h = pi_plan_rows(rows, p.avail_bytes - used, p.split_cost_us);
    double mass_gpu = 0, mass_all = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
        res.dev_rows[rows[i].il] = h[i];
        res.rows_bytes += h[i] * (int64_t) rows[i].row;
        mass_all += rows[i].tail[0];
        mass_gpu += rows[i].tail[0] - rows[i].tail[h[i]];
    }
    res.mass_share = mass_all > 0 ? mass_gpu / mass_all : 0.0;
    return res;
}

int32_t llama_pi_plan(const llama_pi_plan_layer * layers, int32_t n_layer, llama_pi_plan_params params, int32_t * dev_rows) {
    if (layers == nullptr || dev_rows == nullptr || n_layer < 0) {
        return -2;
    }
    for (int il = 0; il < n_layer; ++il) {
        if (layers[il].n_rows < 0 || (layers[il].n_rows > 0 && layers[il].freq == nullptr)) {
            return -2;
        }
    }
    const llama_pi_plan_result res = llama_pi_plan_layers(layers, n_layer, params);
    for (int il = 0; il < n_layer; ++il) {
        dev_rows[il] = (int32_t) res.dev_rows[il];
    }
    return res.n_gpu_layers;
}
