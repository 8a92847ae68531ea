//! The example functions the `cerbas` binary serves. They behave as the original's
//! (so its clients and tests keep working), plus `sleep`, `tally` and `primes`,
//! which benchmarks, tests and users need. They use only cerbas's public API, as a
//! user's own functions would; copy one to start yours.
//! Not for: anything the engine needs (the library knows none of these).

use cerbas::config::ProxyTarget;
use cerbas::{Context, FnError, NoArgs, Registry};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Number, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest `below` that `primes` accepts.
pub const PRIMES_CAP: u64 = 100_000_000;

/// Registers every example function.
pub fn register(r: &mut Registry) {
    r.register("hello", hello);
    r.register("echo", echo);
    r.register("withargs", withargs);
    r.register("witherror", witherror);
    r.register("sum", sum);
    r.register("slow", slow);
    r.register("asyncfunc", asyncfunc);
    r.register("dummy", dummy);
    r.register("halt", halt);
    r.register("sleep", sleep);
    r.register("tally", tally);
    r.register("primes", primes);
}

#[derive(Deserialize)]
struct Proxied {
    server: String,
}

/// Registers the original's `proxiedhostport {server}`: the port of the proxy
/// target named `server` in the configuration (`flask` → 5000), which the
/// original's demo web apps call to learn the port to listen on.
pub fn register_proxied(r: &mut Registry, targets: &[ProxyTarget]) {
    let ports: BTreeMap<String, u16> = targets
        .iter()
        .filter_map(|t| Some((t.label().to_string(), t.port()?)))
        .collect();
    r.register(
        "proxiedhostport",
        move |a: Proxied, _: &Context| -> Result<u16, FnError> {
            ports
                .get(&a.server)
                .copied()
                .ok_or_else(|| format!("no proxy target named {:?}", a.server).into())
        },
    );
}

fn hello(_: NoArgs, _: &Context) -> Result<&'static str, FnError> {
    Ok("hello world!")
}

#[derive(Deserialize)]
struct Echo {
    message: Value,
}

fn echo(a: Echo, _: &Context) -> Result<Value, FnError> {
    Ok(a.message)
}

#[derive(Deserialize)]
struct WithArgs {
    foo: Value,
}

fn withargs(a: WithArgs, _: &Context) -> Result<Value, FnError> {
    Ok(a.foo)
}

fn witherror(_: NoArgs, _: &Context) -> Result<(), FnError> {
    Err("unexpected error".into())
}

#[derive(Deserialize)]
struct Sum {
    a: Number,
    b: Number,
}

/// Integers add exactly (as the original's Elixir did), anywhere in the range of
/// 64-bit integers (`i64::MIN` to `u64::MAX`); a sum outside it is an error, not a
/// rounded float. Anything else adds as floats; a sum too large for a float
/// (`1e308 + 1e308`) is an error, not `null`.
fn sum(Sum { a, b }: Sum, _: &Context) -> Result<Value, FnError> {
    let int = |n: &Number| n.as_i64().map(i128::from).or(n.as_u64().map(i128::from));
    if let (Some(x), Some(y)) = (int(&a), int(&b)) {
        let s = x + y;
        if let Ok(s) = i64::try_from(s) {
            return Ok(json!(s));
        }
        if let Ok(s) = u64::try_from(s) {
            return Ok(json!(s));
        }
        return Err(format!("the sum {s} is outside the range of 64-bit integers").into());
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if (x + y).is_finite() => Ok(json!(x + y)),
        (Some(_), Some(_)) => Err("the sum is too large for a float".into()),
        _ => Err("a and b must be numbers".into()),
    }
}

/// Sleeps past the default 5 s timeout, so its caller gets `timeout`, as with the
/// original.
fn slow(_: NoArgs, _: &Context) -> Result<Value, FnError> {
    std::thread::sleep(Duration::from_secs(6));
    Ok(json!({"foo": "bar"}))
}

/// Answers at once; its work goes on in a thread of its own.
fn asyncfunc(_: NoArgs, _: &Context) -> Result<&'static str, FnError> {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(1));
        log::info!("asyncfunc: background work done");
    });
    Ok("")
}

fn dummy(_: NoArgs, _: &Context) -> Result<(), FnError> {
    Ok(())
}

#[derive(Deserialize)]
struct Halt {
    #[serde(default)]
    delay: u64,
}

/// Answers `""`, then shuts the server down gracefully after `delay` ms. The
/// shipped configuration lets only user `foo` call it.
fn halt(a: Halt, ctx: &Context) -> Result<&'static str, FnError> {
    log::info!(
        "halt requested by {:?}: stopping in {} ms",
        ctx.user(),
        a.delay
    );
    ctx.shutdown_after(Duration::from_millis(a.delay));
    Ok("")
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
}

/// An I/O-bound call: sleeps `ms` milliseconds and answers `ms`. A sleep past
/// the call's deadline is refused at once: its caller would get `timeout` anyway,
/// and its worker would sleep on after it (200 calls of an hour once held every
/// worker for an hour). Raise `[functions.sleep] timeout_ms` for longer sleeps.
fn sleep(a: Sleep, ctx: &Context) -> Result<u64, FnError> {
    // Whole milliseconds, rounded up: a sleep as long as the function's timeout
    // is at its deadline, not past it.
    let left = ctx.time_left().as_micros().div_ceil(1000);
    if u128::from(a.ms) > left {
        return Err(format!(
            "ms must be at most the call's deadline: {} asked, {left} left",
            a.ms
        )
        .into());
    }
    std::thread::sleep(Duration::from_millis(a.ms));
    Ok(a.ms)
}

#[derive(Deserialize)]
struct Tally {
    name: String,
}

/// Increments `P-TALLY-{name}` in Redis and answers its new value: a function that
/// uses Redis through the context's pool.
fn tally(a: Tally, ctx: &Context) -> Result<i64, FnError> {
    let mut conn = ctx.redis()?;
    let n: i64 = redis::cmd("INCR")
        .arg(ctx.key(&format!("TALLY-{}", a.name)))
        .query(&mut *conn)?;
    Ok(n)
}

#[derive(Deserialize)]
struct Primes {
    below: u64,
}

/// How many primes are below `below`: a CPU-heavy function that spreads its work
/// over every core with rayon while holding one worker.
fn primes(a: Primes, _: &Context) -> Result<u64, FnError> {
    if a.below > PRIMES_CAP {
        return Err(format!("below must be at most {PRIMES_CAP}").into());
    }
    Ok(count_primes_below(a.below))
}

/// Segmented sieve: base primes up to √n, then segments sieved in parallel.
fn count_primes_below(n: u64) -> u64 {
    if n <= 2 {
        return 0;
    }
    let root = (n as f64).sqrt() as u64 + 1;
    let mut is_composite = vec![false; root as usize + 1];
    let mut base = Vec::new();
    for i in 2..=root {
        if !is_composite[i as usize] {
            base.push(i);
            let mut j = i * i;
            while j <= root {
                is_composite[j as usize] = true;
                j += i;
            }
        }
    }
    const SEGMENT: u64 = 1 << 18;
    (0..n.div_ceil(SEGMENT))
        .into_par_iter()
        .map(|s| {
            let lo = (s * SEGMENT).max(2);
            let hi = ((s + 1) * SEGMENT).min(n);
            if lo >= hi {
                return 0;
            }
            let mut composite = vec![false; (hi - lo) as usize];
            for &p in &base {
                if p * p >= hi {
                    break;
                }
                let mut j = (lo.div_ceil(p) * p).max(p * p);
                while j < hi {
                    composite[(j - lo) as usize] = true;
                    j += p;
                }
            }
            composite.iter().filter(|c| !**c).count() as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prime_counts() {
        for (n, want) in [
            (0, 0),
            (2, 0),
            (3, 1),
            (10, 4),
            (100, 25),
            (1_000_000, 78_498),
            (10_000_000, 664_579),
        ] {
            assert_eq!(count_primes_below(n), want, "below {n}");
        }
    }

    #[test]
    fn sum_keeps_integers_exact() {
        let ctx = Context::detached();
        let n = |v: Value| serde_json::from_value::<Number>(v).unwrap();
        let s = |a, b| sum(Sum { a: n(a), b: n(b) }, &ctx).unwrap();
        assert_eq!(s(json!(1), json!(2)), json!(3));
        assert_eq!(s(json!(1.5), json!(2)), json!(3.5));
        assert_eq!(s(json!(i64::MAX), json!(1)), json!(i64::MAX as u64 + 1));
        assert_eq!(s(json!(u64::MAX), json!(-1)), json!(u64::MAX - 1));
        assert_eq!(s(json!(i64::MIN), json!(0)), json!(i64::MIN));
        let e = |a, b| sum(Sum { a: n(a), b: n(b) }, &ctx).unwrap_err().to_string();
        assert_eq!(
            e(json!(u64::MAX), json!(1)),
            "the sum 18446744073709551616 is outside the range of 64-bit integers"
        );
        assert_eq!(
            e(json!(i64::MIN), json!(-1)),
            "the sum -9223372036854775809 is outside the range of 64-bit integers"
        );
        assert_eq!(
            e(json!(1e308), json!(1e308)),
            "the sum is too large for a float"
        );
    }

    #[test]
    fn caps_are_errors() {
        let ctx = Context::detached();
        assert!(primes(
            Primes {
                below: PRIMES_CAP + 1
            },
            &ctx
        )
        .is_err());
        // A detached context has the default 5 s deadline.
        let e = sleep(Sleep { ms: u64::MAX }, &ctx).unwrap_err().to_string();
        assert!(
            e.starts_with("ms must be at most the call's deadline: "),
            "{e}"
        );
        assert!(tally(Tally { name: "x".into() }, &ctx).is_err());
    }
}
