// Portable elementary functions for digested arithmetic.
//
// glibc selects different exp/log implementations per CPU (ifunc: FMA and non-FMA variants), so a
// codebook trained with std::log could differ in the last bit between two x86-64 machines. The RNG
// samplers therefore use these functions, built only from +, -, *, /, sqrt, frexp and ldexp (all
// exactly specified by IEEE-754 and C), under -ffp-contract=off. Accuracy is a few ulp; what matters
// is that every machine computes the same bits. The algorithms are specified in docs/FORMAT.md.
// Thread safety: pure functions.
#ifndef FIBQUANT_CORE_PORTABLE_MATH_H_
#define FIBQUANT_CORE_PORTABLE_MATH_H_

namespace fibquant {

// Natural logarithm of x > 0 (finite). Returns -inf for 0, NaN for negative or NaN input.
double PortableLog(double x);
// e^x. Overflows to +inf above ~709.78, underflows to 0 below ~-745.
double PortableExp(double x);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_PORTABLE_MATH_H_
