// Autograd of the LSLR op family (lslr_update, _lslr_scale, _lslr_dot), registered in C++ at
// the Autograd dispatch key.
//
// Registered from Python (torch.library.register_autograd) the autograd cost hundreds of Python
// calls per op call and per backward call (450-600 and ~470 for a 10-tensor list, torch 2.14.1)
// and tens of microseconds of host time each; a MAML++ meta-step makes ~150 such calls, so on a
// GPU the step waited for the host (issue 11). Here no Python runs. Each op gets a
// torch::autograd::Function whose forward redispatches below autograd to the CPU/CUDA kernel and
// whose backward calls the ops again *through the dispatcher*: with create_graph=True those calls
// reach these kernels once more and record their own nodes, so every order of derivative runs on
// the fused kernels (NOTE [LSLR op family] in include/mamlpp/lslr.h).
//
// NOTE [LSLR autograd: lists, undefined gradients, saved tensors]
// * Lists. Every element of a Tensor[] argument is an input of the autograd node of its own, so
//   the backward asks ctx->needs_input_grad per element and returns one gradient per element
//   (undefined where none is needed). The derivative of a list is computed only for the
//   positions whose output gradient is defined and whose input needs a gradient.
// * Undefined output gradients (an output that the loss does not use) are not materialised as
//   zeros (set_materialize_grads(false)). When every position is kept the ops run on the whole
//   list, as before. When only some are, they run on the kept sub-list with the matching rows
//   of the rates (narrow views, concatenated when the rows are not consecutive), and the rates'
//   gradient is put back at its rows with zeros between them ((gap, S) tensors: the size of the
//   rates, never of a weight). When none is, no op runs and the gradient is undefined (zero).
// * Saved tensors: only what a derivative whose input requires grad at forward time reads.
//   lslr_update / _lslr_scale save the rates when the list or the rates require grad, and the
//   other list (grads / xs) only when the rates require grad; _lslr_dot saves ys when xs require
//   grad and xs when ys do. `like` of _lslr_dot only lends its shape, dtype and device: it is no
//   input of the node (its values have no derivative), so it never makes the result require grad.
// * Grad mode off, or no input requiring grad: the kernel is called directly, no node is built.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace mamlpp {
namespace autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- the ops, through the dispatcher ----------------------------------------------------------

using UpdateSig = std::vector<at::Tensor>(at::TensorList, at::TensorList, const at::Tensor&, int64_t);
using ScaleSig = std::vector<at::Tensor>(at::TensorList, const at::Tensor&, int64_t, double);
using DotSig = at::Tensor(at::TensorList, at::TensorList, const at::Tensor&, int64_t, double);

const c10::TypedOperatorHandle<UpdateSig>& update_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamlpp_ext::lslr_update", "")
                             .typed<UpdateSig>();
  return op;
}

const c10::TypedOperatorHandle<ScaleSig>& scale_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamlpp_ext::_lslr_scale", "")
                             .typed<ScaleSig>();
  return op;
}

const c10::TypedOperatorHandle<DotSig>& dot_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamlpp_ext::_lslr_dot", "")
                             .typed<DotSig>();
  return op;
}

bool any_requires_grad(at::TensorList list) {
  for (const auto& t : list) {
    if (t.requires_grad()) return true;
  }
  return false;
}

// ---- sub-lists (NOTE [LSLR autograd: lists, undefined gradients, saved tensors]) --------------

// Positions of a list, ascending.
using Positions = std::vector<int64_t>;

// Runs of consecutive positions, as (first, length).
std::vector<std::pair<int64_t, int64_t>> runs_of(const Positions& pos) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (const int64_t k : pos) {
    if (!runs.empty() && runs.back().first + runs.back().second == k) {
      ++runs.back().second;
    } else {
      runs.emplace_back(k, 1);
    }
  }
  return runs;
}

// Rows `pos` (non-empty) of a (K, S) tensor, differentiably: a view when they are consecutive.
at::Tensor gather_rows(const at::Tensor& t, const Positions& pos) {
  const auto runs = runs_of(pos);
  if (runs.size() == 1) return t.narrow(0, runs[0].first, runs[0].second);
  std::vector<at::Tensor> parts;
  parts.reserve(runs.size());
  for (const auto& [first, len] : runs) parts.push_back(t.narrow(0, first, len));
  return at::cat(parts, 0);
}

// The inverse: a (K, S) tensor with row pos[i] = row i of `sub` (len(pos), S), zero elsewhere.
at::Tensor scatter_rows(const at::Tensor& sub, const Positions& pos, int64_t K) {
  std::vector<at::Tensor> parts;
  const auto zero_rows = [&](int64_t n) {
    return at::zeros_symint({c10::SymInt(n), sub.sym_size(1)}, sub.options());
  };
  int64_t next = 0;  // next row of the result
  int64_t row = 0;   // next row of `sub`
  for (const auto& [first, len] : runs_of(pos)) {
    if (first > next) parts.push_back(zero_rows(first - next));
    parts.push_back(sub.narrow(0, row, len));
    row += len;
    next = first + len;
  }
  if (next < K) parts.push_back(zero_rows(K - next));
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

std::vector<at::Tensor> take(at::TensorList list, const Positions& pos) {
  std::vector<at::Tensor> out;
  out.reserve(pos.size());
  for (const int64_t k : pos) out.push_back(list[k]);
  return out;
}

// grads[offset + k] = _lslr_scale(xs, rates, step, alpha)[k] for k in `pos`; the others untouched.
void scale_at(variable_list& grads, size_t offset, at::TensorList xs, const Positions& pos,
              const at::Tensor& rates, int64_t step, double alpha) {
  if (pos.empty()) return;
  if (pos.size() == xs.size()) {
    auto r = scale_op().call(xs, rates, step, alpha);
    for (size_t k = 0; k < r.size(); ++k) grads[offset + k] = std::move(r[k]);
    return;
  }
  auto r = scale_op().call(take(xs, pos), gather_rows(rates, pos), step, alpha);
  for (size_t i = 0; i < r.size(); ++i) grads[offset + pos[i]] = std::move(r[i]);
}

// _lslr_dot(xs, ys, like, step, alpha) with the terms outside `pos` left out (they are zero);
// undefined (zero) when `pos` is empty and the list is not.
at::Tensor dot_at(at::TensorList xs, at::TensorList ys, const Positions& pos,
                  const at::Tensor& like, int64_t step, double alpha) {
  if (pos.size() == xs.size()) return dot_op().call(xs, ys, like, step, alpha);
  if (pos.empty()) return at::Tensor();
  const auto n = static_cast<int64_t>(pos.size());
  const auto sub_like = at::empty_symint({c10::SymInt(n), like.sym_size(1)}, like.options());
  const auto sub = dot_op().call(take(xs, pos), take(ys, pos), sub_like, step, alpha);
  return scatter_rows(sub, pos, static_cast<int64_t>(xs.size()));
}

// ---- lslr_update ------------------------------------------------------------------------------
// out_k = params_k - lrs[k, step] * grads_k
//   d/d params_k = g_k;  d/d grads = _lslr_scale(g, lrs, step, -1);
//   d/d lrs = _lslr_dot(g, grads, lrs, step, -1).
// Saved: [lrs or undefined, grads... (only when lrs requires grad)].

struct LslrUpdateFunction : public torch::autograd::Function<LslrUpdateFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads,
                               const at::Tensor& lrs, int64_t step) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["step"] = step;
    const bool lrs_rg = lrs.requires_grad();
    variable_list to_save;
    to_save.reserve(lrs_rg ? grads.size() + 1 : 1);
    to_save.push_back(lrs_rg || any_requires_grad(grads) ? lrs : at::Tensor());
    if (lrs_rg) to_save.insert(to_save.end(), grads.begin(), grads.end());
    ctx->save_for_backward(std::move(to_save));

    at::AutoDispatchBelowADInplaceOrView guard;
    return update_op().call(params, grads, lrs, step);
  }

  static variable_list backward(AutogradContext* ctx, variable_list gouts) {
    const auto K = gouts.size();
    const int64_t step = ctx->saved_data["step"].toInt();
    // Inputs of the node: params (0..K-1), grads (K..2K-1), lrs (2K). Results: one per argument.
    variable_list result(2 * K + 2);
    Positions for_grads, defined;
    for (size_t k = 0; k < K; ++k) {
      if (!gouts[k].defined()) continue;
      if (ctx->needs_input_grad(k)) result[k] = gouts[k];
      if (ctx->needs_input_grad(K + k)) for_grads.push_back(static_cast<int64_t>(k));
      defined.push_back(static_cast<int64_t>(k));
    }
    const bool for_lrs = ctx->needs_input_grad(2 * K);
    if (for_grads.empty() && !for_lrs) return result;

    const auto saved = ctx->get_saved_variables();
    const at::Tensor& lrs = saved[0];
    scale_at(result, K, gouts, for_grads, lrs, step, -1.0);
    if (for_lrs) {
      const at::TensorList grads(saved.data() + 1, K);
      result[2 * K] = dot_at(gouts, grads, defined, lrs, step, -1.0);
    }
    return result;
  }
};

// ---- _lslr_scale ------------------------------------------------------------------------------
// out_k = alpha * lrs[k, step] * xs_k
//   d/d xs = _lslr_scale(g, lrs, step, alpha);  d/d lrs = _lslr_dot(g, xs, lrs, step, alpha).
// Saved: [lrs or undefined, xs... (only when lrs requires grad)].

struct LslrScaleFunction : public torch::autograd::Function<LslrScaleFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, const at::Tensor& lrs,
                               int64_t step, double alpha) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["step"] = step;
    ctx->saved_data["alpha"] = alpha;
    const bool lrs_rg = lrs.requires_grad();
    variable_list to_save;
    to_save.reserve(lrs_rg ? xs.size() + 1 : 1);
    to_save.push_back(lrs_rg || any_requires_grad(xs) ? lrs : at::Tensor());
    if (lrs_rg) to_save.insert(to_save.end(), xs.begin(), xs.end());
    ctx->save_for_backward(std::move(to_save));

    at::AutoDispatchBelowADInplaceOrView guard;
    return scale_op().call(xs, lrs, step, alpha);
  }

  static variable_list backward(AutogradContext* ctx, variable_list gouts) {
    const auto K = gouts.size();
    const int64_t step = ctx->saved_data["step"].toInt();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    // Inputs of the node: xs (0..K-1), lrs (K). Results: xs, lrs, step, alpha.
    variable_list result(K + 3);
    Positions for_xs, defined;
    for (size_t k = 0; k < K; ++k) {
      if (!gouts[k].defined()) continue;
      if (ctx->needs_input_grad(k)) for_xs.push_back(static_cast<int64_t>(k));
      defined.push_back(static_cast<int64_t>(k));
    }
    const bool for_lrs = ctx->needs_input_grad(K);
    if (for_xs.empty() && !for_lrs) return result;

    const auto saved = ctx->get_saved_variables();
    const at::Tensor& lrs = saved[0];
    scale_at(result, 0, gouts, for_xs, lrs, step, alpha);
    if (for_lrs) {
      const at::TensorList xs(saved.data() + 1, K);
      result[K] = dot_at(gouts, xs, defined, lrs, step, alpha);
    }
    return result;
  }
};

// ---- _lslr_dot --------------------------------------------------------------------------------
// out[k, step] = alpha * <xs_k, ys_k>, zero elsewhere; with g the (K, S) output gradient,
//   d/d xs = _lslr_scale(ys, g, step, alpha);  d/d ys = _lslr_scale(xs, g, step, alpha).
// Saved: [ys... (when xs require grad), xs... (when ys require grad)].

// `like` passed through Function::apply as a non-tensor, so it is not an input of the node.
struct Like {
  const at::Tensor& tensor;
};

struct LslrDotFunction : public torch::autograd::Function<LslrDotFunction> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList xs, at::TensorList ys,
                            const Like& like, int64_t step, double alpha) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["step"] = step;
    ctx->saved_data["alpha"] = alpha;
    const bool xs_rg = any_requires_grad(xs);
    const bool ys_rg = any_requires_grad(ys);
    ctx->saved_data["K"] = static_cast<int64_t>(xs.size());
    ctx->saved_data["ys_saved"] = xs_rg;  // then xs follow ys in the saved list
    variable_list to_save;
    to_save.reserve((xs_rg + ys_rg) * xs.size());
    if (xs_rg) to_save.insert(to_save.end(), ys.begin(), ys.end());
    if (ys_rg) to_save.insert(to_save.end(), xs.begin(), xs.end());
    ctx->save_for_backward(std::move(to_save));

    at::AutoDispatchBelowADInplaceOrView guard;
    return dot_op().call(xs, ys, like.tensor, step, alpha);
  }

  static variable_list backward(AutogradContext* ctx, variable_list gouts) {
    const int64_t step = ctx->saved_data["step"].toInt();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const auto K = static_cast<size_t>(ctx->saved_data["K"].toInt());
    // Inputs of the node: xs (0..K-1), ys (K..2K-1). Results: xs, ys, like, step, alpha.
    variable_list result(2 * K + 3);
    const at::Tensor& g = gouts[0];
    if (!g.defined()) return result;

    Positions for_xs, for_ys;
    for (size_t k = 0; k < K; ++k) {
      if (ctx->needs_input_grad(k)) for_xs.push_back(static_cast<int64_t>(k));
      if (ctx->needs_input_grad(K + k)) for_ys.push_back(static_cast<int64_t>(k));
    }
    if (for_xs.empty() && for_ys.empty()) return result;
    const auto saved = ctx->get_saved_variables();
    const size_t xs_at = ctx->saved_data["ys_saved"].toBool() ? K : 0;  // where xs start
    if (!for_xs.empty()) {
      scale_at(result, 0, at::TensorList(saved.data(), K), for_xs, g, step, alpha);
    }
    if (!for_ys.empty()) {
      scale_at(result, K, at::TensorList(saved.data() + xs_at, K), for_ys, g, step, alpha);
    }
    return result;
  }
};

// ---- the Autograd kernels ---------------------------------------------------------------------

std::vector<at::Tensor> lslr_update_autograd(at::TensorList params, at::TensorList grads,
                                             const at::Tensor& lrs, int64_t step) {
  if (at::GradMode::is_enabled() &&
      (lrs.requires_grad() || any_requires_grad(params) || any_requires_grad(grads))) {
    return LslrUpdateFunction::apply(params, grads, lrs, step);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return update_op().call(params, grads, lrs, step);
}

std::vector<at::Tensor> lslr_scale_autograd(at::TensorList xs, const at::Tensor& lrs, int64_t step,
                                            double alpha) {
  if (at::GradMode::is_enabled() && (lrs.requires_grad() || any_requires_grad(xs))) {
    return LslrScaleFunction::apply(xs, lrs, step, alpha);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return scale_op().call(xs, lrs, step, alpha);
}

at::Tensor lslr_dot_autograd(at::TensorList xs, at::TensorList ys, const at::Tensor& like,
                             int64_t step, double alpha) {
  if (at::GradMode::is_enabled() && (any_requires_grad(xs) || any_requires_grad(ys))) {
    return LslrDotFunction::apply(xs, ys, Like{like}, step, alpha);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return dot_op().call(xs, ys, like, step, alpha);
}

}  // namespace
}  // namespace autograd
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, Autograd, m) {
  m.impl("lslr_update", &mamlpp::autograd::lslr_update_autograd);
  m.impl("_lslr_scale", &mamlpp::autograd::lslr_scale_autograd);
  m.impl("_lslr_dot", &mamlpp::autograd::lslr_dot_autograd);
}
