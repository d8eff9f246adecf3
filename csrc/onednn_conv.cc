// oneDNN convolutions for XLA:CPU, as XLA FFI handlers (loaded by ntksap_jax/_onednn.py).
//
// Three handlers, all float32, activations NHWC and kernels HWIO (the layouts of Flax's nn.Conv):
//   ntksap_onednn_conv_fwd          (x[N,H,W,C], w[KH,KW,C,O])    -> y[N,OH,OW,O]
//   ntksap_onednn_conv_bwd_data     (dy[N,OH,OW,O], w[KH,KW,C,O]) -> dx[N,H,W,C]
//   ntksap_onednn_conv_bwd_weights  (x[N,H,W,C], dy[N,OH,OW,O])   -> dw[KH,KW,C,O]
// with attributes sh, sw (strides) and pt, pb, pl, pr (padding: top, bottom, left, right).
//
// Activations are handed to oneDNN in place (format nhwc); the kernel is reordered from HWIO to the
// format the primitive asks for ("any"), and the weight gradient back to HWIO. Primitives come from
// oneDNN's own primitive cache (keyed by the descriptors), so a shape seen before is not re-JIT-ed.
// Written against the oneDNN 2.x C++ API (Debian's libdnnl-dev 2.6).

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// User-managed scratchpads: each execution allocates its own. XLA may run independent custom calls
// (a ResNet's shortcut and main branch) on several threads at once, and oneDNN's library-managed
// scratchpad is shared between primitives unless oneDNN was built with DNNL_ENABLE_CONCURRENT_EXEC.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

template <typename PD>
dnnl::memory Scratchpad(const PD& pd) {
  return dnnl::memory(pd.scratchpad_desc(), Engine());
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow;
  memory::dims strides, pad_l, pad_r;

  memory::desc Act(bool output) const {
    return output ? memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc) : memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  }
  memory::desc Weights(tag format) const { return memory::desc({o, c, kh, kw}, dt::f32, format); }

  dnnl::convolution_forward::primitive_desc Forward() const {
    dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                         Act(false), Weights(tag::any), Act(true), strides, pad_l, pad_r);
    return dnnl::convolution_forward::primitive_desc(desc, UserScratchpad(), Engine());
  }
};

ffi::Error Invalid(const std::string& what) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, what); }

// dims: x (N,H,W,C), w (KH,KW,C,O), y (N,OH,OW,O), whichever of them the handler has.
ffi::ErrorOr<Geometry> MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                                    ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                                    int64_t pl, int64_t pr) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) return ffi::Unexpected(Invalid("onednn conv: rank-4 operands"));
  if (x[3] != w[2] || y[3] != w[3] || x[0] != y[0]) return ffi::Unexpected(Invalid("onednn conv: shapes disagree"));
  Geometry g{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], {sh, sw}, {pt, pl}, {pb, pr}};
  return g;
}

// Kernel reorders are small (at most a few MB): one thread does them. Under OpenMP a parallel
// region costs a team wake-up, which on a loaded 2-core machine took milliseconds per reorder.
void SmallReorder(dnnl::memory& from, dnnl::memory& to, dnnl::stream& stream) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  dnnl::reorder::primitive_desc pd(Engine(), from.get_desc(), Engine(), to.get_desc(), UserScratchpad());
  dnnl::memory scratch = Scratchpad(pd);
  dnnl::reorder(pd).execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratch}});
  omp_set_num_threads(threads);
}

dnnl::memory Reordered(dnnl::memory from, const memory::desc& to, dnnl::stream& stream) {
  if (from.get_desc() == to) return from;
  dnnl::memory out(to, Engine());
  SmallReorder(from, out, stream);
  return out;
}

bool EnvOn(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr) return fallback;
  return std::string(v) != "0";
}

// One oneDNN call at a time per process: each already runs on every core (OpenMP), and XLA runs
// independent custom calls (NTK-SAP's two forward passes) on several threads at once, which
// oversubscribes the cores: on 2 cores a ResNet-20 NTK-SAP sample step took 3% longer that way
// (benchmarks/onednn_serial.py: 452 ms against 440 ms, medians of 45). NTKSAP_JAX_ONEDNN_SERIAL=0
// lets them overlap.
template <typename F>
ffi::Error Guarded(F&& body) {
  static const bool serial = EnvOn("NTKSAP_JAX_ONEDNN_SERIAL", true);
  static std::mutex one_at_a_time;
  std::unique_lock<std::mutex> lock(one_at_a_time, std::defer_lock);
  if (serial) lock.lock();
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

ffi::Error ConvFwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                   int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto geometry = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  if (geometry.has_error()) return geometry.error();
  const Geometry& g = geometry.value();
  return Guarded([&] {
    dnnl::stream stream(Engine());
    auto pd = g.Forward();
    dnnl::memory src(g.Act(false), Engine(), x.typed_data());
    dnnl::memory dst(g.Act(true), Engine(), y->typed_data());
    dnnl::memory user_w(g.Weights(tag::hwio), Engine(), w.typed_data());
    dnnl::memory wei = Reordered(user_w, pd.weights_desc(), stream);
    dnnl::memory scratch = Scratchpad(pd);
    dnnl::convolution_forward(pd).execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                                                   {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  });
}

ffi::Error ConvBwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto geometry = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  if (geometry.has_error()) return geometry.error();
  const Geometry& g = geometry.value();
  return Guarded([&] {
    dnnl::stream stream(Engine());
    dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, g.Act(false),
                                               g.Weights(tag::any), g.Act(true), g.strides, g.pad_l, g.pad_r);
    dnnl::convolution_backward_data::primitive_desc pd(desc, UserScratchpad(), Engine(), g.Forward());
    dnnl::memory diff_dst(g.Act(true), Engine(), dy.typed_data());
    dnnl::memory diff_src(g.Act(false), Engine(), dx->typed_data());
    dnnl::memory user_w(g.Weights(tag::hwio), Engine(), w.typed_data());
    dnnl::memory wei = Reordered(user_w, pd.weights_desc(), stream);
    dnnl::memory scratch = Scratchpad(pd);
    dnnl::convolution_backward_data(pd).execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei},
                                                         {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  });
}

ffi::Error ConvBwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto geometry = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  if (geometry.has_error()) return geometry.error();
  const Geometry& g = geometry.value();
  return Guarded([&] {
    dnnl::stream stream(Engine());
    dnnl::convolution_backward_weights::desc desc(dnnl::algorithm::convolution_direct, g.Act(false),
                                                  g.Weights(tag::any), g.Act(true), g.strides, g.pad_l, g.pad_r);
    dnnl::convolution_backward_weights::primitive_desc pd(desc, UserScratchpad(), Engine(), g.Forward());
    dnnl::memory src(g.Act(false), Engine(), x.typed_data());
    dnnl::memory diff_dst(g.Act(true), Engine(), dy.typed_data());
    dnnl::memory user_dw(g.Weights(tag::hwio), Engine(), dw->typed_data());
    bool direct = pd.diff_weights_desc() == user_dw.get_desc();
    dnnl::memory diff_w = direct ? user_dw : dnnl::memory(pd.diff_weights_desc(), Engine());
    dnnl::memory scratch = Scratchpad(pd);
    dnnl::convolution_backward_weights(pd).execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                                            {DNNL_ARG_DIFF_WEIGHTS, diff_w},
                                                            {DNNL_ARG_SCRATCHPAD, scratch}});
    if (!direct) SmallReorder(diff_w, user_dw, stream);
    stream.wait();
  });
}

}  // namespace

#define NTKSAP_CONV_ATTRS                                                                                    \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl")      \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ntksap_onednn_conv_fwd, ConvFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() NTKSAP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ntksap_onednn_conv_bwd_data, ConvBwdData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() NTKSAP_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ntksap_onednn_conv_bwd_weights, ConvBwdWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() NTKSAP_CONV_ATTRS);

// The oneDNN version this library runs with, for the Python side's notes: major*10000 + minor*100 + patch.
extern "C" int ntksap_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return static_cast<int>(v->major * 10000 + v->minor * 100 + v->patch);
}
