// dynamoq::native_decode's CPU kernel, registered with PyTorch's dispatcher when native.py loads this library:
// from the compiled graph to the C kernel (native_decode.c) without Python. With the call in Python (ctypes,
// a per-weight plan of its arguments) a 1-token OLMoE-shaped layer spent ~40 us a call there, caches cold.
//
// Per call it derives from the tensors what the kernel needs: each code tensor's base and expert stride by
// bit-width, each expert's width and slot among the experts of that width (from expert_bits), and the
// lane-to-group table of each plane width (cached per shape). A weight's buffers move to 2 MB pages on the
// first call that reads them (dynamoq_huge_pages).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

extern "C" int dynamoq_decode(int64_t S, int64_t X, int64_t N, int64_t K, int64_t gs, int64_t E, const void *x, int x_bf16,
                              const int64_t *ids, const int32_t *expert_meta, const int64_t *width_base,
                              const int64_t *width_stride, const int32_t *planes, const int64_t *lane_group,
                              int lanes, const uint16_t *scale, const uint8_t *zero, float *y, int threads,
                              const int64_t *cache_idx, const void *cache_delta, int64_t r, int delta_type,
                              const uint8_t *cache_on);

namespace {

int32_t planes[9][2][2];        // packing.PLANES, set once by native.py: [bits][plane] = (offset, width)
int lanes_of[1025];             // packing.lanes(group_size) for group sizes up to 1024, set with the planes
std::mutex mu;
std::set<std::pair<uintptr_t, size_t>> collapsed;     // the buffers dynamoq_huge_pages has seen

// [blocks * 16] int32: the group of each int32 lane of a plane of width w, minus its 64-byte block's first group.
const int32_t *lane_group(int64_t k, int64_t gs, int w) {
    static std::map<std::tuple<int64_t, int64_t, int>, std::vector<int32_t>> cache;
    std::lock_guard<std::mutex> lock(mu);
    auto &t = cache[{k, gs, w}];
    if (t.empty()) {
        const int64_t nbytes = k * w / 8, bpg = gs * w / 8;
        t.resize((nbytes + 63) / 64 * 16);
        for (int64_t l = 0; l < (int64_t)t.size(); l++) t[l] = (int32_t)((4 * l) / bpg - (64 * (l / 16)) / bpg);
    }
    return t.data();
}

// Which experts of a cache_delta [E, ...] hold a nonzero correction (any nonzero byte): the kernel skips the others,
// so a model with a switching cache runs at full speed until a switch, and after one pays only for the experts it
// switched. Computed once per version of the tensor (every in-place write, copy_ or zero_ or through a view, bumps
// it), held weakly (a freed tensor's entry is never matched again). An inference tensor has no version: all on.
struct Seen {
    c10::weak_intrusive_ptr<c10::TensorImpl> owner;
    int64_t version;
    std::vector<uint8_t> on;
};
std::map<const c10::TensorImpl *, Seen> seen;       // under mu

std::vector<uint8_t> experts_on(const at::Tensor &delta_in, const at::Tensor &delta, int64_t E) {
    if (delta_in.is_inference()) return std::vector<uint8_t>(E, 1);
    const c10::TensorImpl *key = delta_in.unsafeGetTensorImpl();
    const int64_t version = delta_in._version();
    {
        std::lock_guard<std::mutex> lock(mu);
        auto it = seen.find(key);
        if (it != seen.end() && it->second.version == version && it->second.owner.lock().get() == key) return it->second.on;
    }
    std::vector<uint8_t> on(E, 0);
    const size_t per = (size_t)(delta.numel() / std::max<int64_t>(E, 1)) * delta.element_size();
    const uint8_t *b = (const uint8_t *)delta.data_ptr();
    for (int64_t e = 0; e < E; e++)
        on[e] = std::any_of(b + e * per, b + (e + 1) * per, [](uint8_t v) { return v != 0; });
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = seen.begin(); it != seen.end();) it = it->second.owner.expired() ? seen.erase(it) : std::next(it);
    seen.insert_or_assign(key, Seen{c10::weak_intrusive_ptr<c10::TensorImpl>(delta_in.getIntrusivePtr()), version, on});
    return on;
}

}  // namespace

extern "C" void dynamoq_set_tables(const int32_t *p, const int32_t *lanes) {
    std::copy(p, p + 36, &planes[0][0][0]);
    std::copy(lanes, lanes + 1025, lanes_of);
}

// Transparent huge pages for [p, p + n): the 2 MB-aligned part, once per (p, n) (see native.huge_pages).
// -> whether Linux moved it on this call.
extern "C" int dynamoq_huge_pages(const void *p, size_t n) {
    static const bool off = [] { const char *v = std::getenv("DYNAMOQ_HUGE_PAGES"); return v && v[0] == '0' && !v[1]; }();
    const uintptr_t a = (uintptr_t)p, huge = 2u << 20;
    {
        std::lock_guard<std::mutex> lock(mu);
        if (!collapsed.insert({a, n}).second) return 0;
    }
    const uintptr_t lo = (a + huge - 1) / huge * huge, hi = (a + n) / huge * huge;
    return !off && hi > lo && madvise((void *)lo, hi - lo, 25 /* MADV_COLLAPSE */) == 0;
}

// Whether dynamoq_huge_pages has seen (p, n).
extern "C" int dynamoq_huge_pages_seen(const void *p, size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    return collapsed.count({(uintptr_t)p, n}) > 0;
}

namespace {

at::Tensor native_decode(const at::Tensor &x_in, const at::Tensor &ids_in, at::TensorList codes,
                         at::IntArrayRef expert_bits, const at::Tensor &scale_in, const at::Tensor &zero_in,
                         int64_t group_size, const std::optional<at::Tensor> &cache_idx_in,
                         const std::optional<at::Tensor> &cache_delta_in) {
    // x [X, K], ids [S] (S = X, or S = k X: pair s reads row s / k), codes: q{b} [E_b, N, K * b / 8] of each
    // width present (ascending), scale / zero [E, N, G]; a switching cache: cache_idx [E, r], cache_delta [E, N, r]
    TORCH_CHECK_VALUE(x_in.dim() == 2 && scale_in.dim() == 3, "native_decode: x must be [X, K], scale [E, N, G]");
    const int64_t X = x_in.size(0), S = ids_in.numel(), E = scale_in.size(0), N = scale_in.size(1),
                  K = scale_in.size(2) * group_size;
    TORCH_CHECK_VALUE(X ? S % X == 0 : S == 0, "native_decode: ", S, " pairs for ", X,
                      " rows of x (each row must serve the same number of pairs)");
    TORCH_CHECK_VALUE(x_in.size(1) == K, "native_decode: x has ", x_in.size(1), " inputs, the weight ", K);
    TORCH_CHECK_VALUE((int64_t)expert_bits.size() == E, "native_decode: ", expert_bits.size(),
                      " bit-widths for ", E, " experts");
    TORCH_CHECK_VALUE(group_size > 0 && group_size <= 1024 && lanes_of[group_size] > 0,
                      "native_decode: group size ", group_size, " is not one the kernel takes");
    at::Tensor x = (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16)
                       ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
    at::Tensor ids = ids_in.to(at::kLong).contiguous(), scale = scale_in.contiguous(), zero = zero_in.contiguous();
    std::vector<int32_t> meta(2 * E);
    int32_t count[9] = {0};
    for (int64_t e = 0; e < E; e++) {
        const int64_t b = expert_bits[e];
        TORCH_CHECK_VALUE(b >= 1 && b <= 8 && planes[b][0][1] > 0, "native_decode: no layout for ", b, " bits");
        meta[2 * e] = (int32_t)b;
        meta[2 * e + 1] = count[b]++;
    }
    int64_t base[9] = {0}, stride[9] = {0}, tables[9] = {0};
    std::vector<at::Tensor> keep;
    size_t c = 0;
    for (int b = 1; b <= 8; b++) {
        if (!count[b]) continue;
        TORCH_CHECK_VALUE(c < codes.size(), "native_decode: no codes for the ", b, "-bit experts");
        keep.push_back(codes[c++].contiguous());
        base[b] = (int64_t)(intptr_t)keep.back().data_ptr();
        stride[b] = keep.back().stride(0);
        for (int i = 0; i < 2; i++) {
            const int w = planes[b][i][1];
            if (w && !tables[w]) tables[w] = (int64_t)(intptr_t)lane_group(K, group_size, w);
        }
    }
    TORCH_CHECK_VALUE(c == codes.size(), "native_decode: ", codes.size(), " code tensors for ", c, " bit-widths");
    at::Tensor cache_idx, cache_delta;
    int delta_type = 0;
    std::vector<uint8_t> on;
    TORCH_CHECK_VALUE(cache_idx_in.has_value() == cache_delta_in.has_value(),
                      "native_decode: a switching cache needs both cache_idx and cache_delta");
    if (cache_idx_in.has_value()) {
        cache_idx = cache_idx_in->to(at::kLong).contiguous();
        const at::ScalarType dt = cache_delta_in->scalar_type();
        cache_delta = (dt == at::kHalf || dt == at::kBFloat16 ? *cache_delta_in : cache_delta_in->to(at::kFloat)).contiguous();
        delta_type = dt == at::kHalf ? 0 : dt == at::kBFloat16 ? 1 : 2;
        const int64_t r = cache_idx.dim() == 2 ? cache_idx.size(1) : -1;
        TORCH_CHECK_VALUE(cache_idx.dim() == 2 && cache_idx.size(0) == E && cache_delta.dim() == 3 &&
                          cache_delta.size(0) == E && cache_delta.size(1) == N && cache_delta.size(2) == r,
                          "native_decode: cache_idx must be [E, r] = [", E, ", r] and cache_delta [E, N, r] = [", E, ", ",
                          N, ", r]; got ", cache_idx.sizes(), " and ", cache_delta.sizes());
        const int64_t *ci = cache_idx.data_ptr<int64_t>();
        for (int64_t i = 0; i < cache_idx.numel(); i++)
            TORCH_CHECK_VALUE(ci[i] >= 0 && ci[i] < K, "native_decode: cached channel ", ci[i], " outside [0, ", K, ")");
        on = experts_on(*cache_delta_in, cache_delta, E);
        if (std::none_of(on.begin(), on.end(), [](uint8_t v) { return v != 0; })) cache_idx = cache_delta = at::Tensor();
    }
    keep.push_back(scale);
    keep.push_back(zero);
    for (const at::Tensor &t : keep) dynamoq_huge_pages(t.data_ptr(), t.numel() * t.element_size());
    at::Tensor y = at::empty({S, N}, x.options().dtype(at::kFloat));
    const int rc = dynamoq_decode(S, X, N, K, group_size, E, x.data_ptr(), x.scalar_type() == at::kBFloat16,
                                  ids.data_ptr<int64_t>(), meta.data(), base, stride, &planes[0][0][0], tables,
                                  lanes_of[group_size], (const uint16_t *)scale.data_ptr(),
                                  zero.data_ptr<uint8_t>(), y.data_ptr<float>(), at::get_num_threads(),
                                  cache_idx.defined() ? cache_idx.data_ptr<int64_t>() : nullptr,
                                  cache_delta.defined() ? cache_delta.data_ptr() : nullptr,
                                  cache_idx.defined() ? cache_idx.size(1) : 0, delta_type, on.data());
    TORCH_CHECK(rc == 0, "dynamoq native decode: could not allocate its scratch memory");
    return y;
}

// The Autograd key's kernel: on to the next key (unboxed), with an x that needs its gradient the result's history
// an error (backward through it raises, as under PyTorch's fallback for kernels without a derivative). Through that
// boxed fallback and back, a call from a compiled graph cost ~15 us more from cold caches.
at::Tensor native_decode_autograd(const at::Tensor &x, const at::Tensor &ids, at::TensorList codes,
                                  at::IntArrayRef expert_bits, const at::Tensor &scale, const at::Tensor &zero,
                                  int64_t group_size, const std::optional<at::Tensor> &cache_idx,
                                  const std::optional<at::Tensor> &cache_delta) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dynamoq::native_decode", "")
                               .typed<decltype(native_decode)>();
    at::Tensor y;
    {
        at::AutoDispatchBelowADInplaceOrView below;     // on to the CPU kernel, or to fake tensors' (tracing)
        y = op.call(x, ids, codes, expert_bits, scale, zero, group_size, cache_idx, cache_delta);
    }
    if (at::GradMode::is_enabled() && x.requires_grad())
        torch::autograd::set_history(y, c10::make_intrusive<torch::autograd::NotImplemented>(
                                            "dynamoq::native_decode", torch::autograd::collect_next_edges(x)));
    return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynamoq, CPU, m) { m.impl("native_decode", &native_decode); }
TORCH_LIBRARY_IMPL(dynamoq, AutogradCPU, m) { m.impl("native_decode", &native_decode_autograd); }
