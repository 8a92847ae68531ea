//! Redis commands packed by hand into one buffer that is kept and reused, for
//! the two pipelines sent once per batch (the reader's take, the publisher's
//! replies). redis-rs builds a `Cmd` per command, grows its buffer argument by
//! argument, and copies the whole pipeline once more to send it; with the key
//! names formatted into fresh `String`s, that was about 15 % of the server's CPU
//! at W2 (a `perf` profile, issue 12). Here a key is written straight from its
//! prefix and id, and nothing is allocated once the buffer has grown (up to a
//! usual batch's size: one grown past it for a large reply is freed).
//! Pure: bytes in a `Vec`, tested here. Not for: reading answers (redis-rs
//! parses them, `connection::query_packed`) or commands off the hot path, where
//! `redis::cmd` reads better.

use std::io::Write;

/// Commands in RESP, ready for one write.
///
/// Each command says first how many arguments it has (its name counted); in
/// debug builds a wrong count panics at the next command or at [`Packed::bytes`].
#[derive(Debug, Default)]
pub(crate) struct Packed {
    bytes: Vec<u8>,
    commands: usize,
    /// Arguments the current command still expects.
    left: usize,
}

/// Most memory a [`Packed`] keeps between pipelines: what a usual batch needs
/// (the publisher's are about 1 MiB). A buffer grown past it for one large
/// pipeline (a reply of tens of MiB) is freed, not kept for the life of the
/// thread.
const KEEP_BYTES: usize = 4 << 20;

impl Packed {
    /// Empties it for the next pipeline, keeping its memory up to [`KEEP_BYTES`].
    pub(crate) fn clear(&mut self) {
        if self.bytes.capacity() > KEEP_BYTES {
            self.bytes = Vec::new();
        }
        self.bytes.clear();
        self.commands = 0;
        self.left = 0;
    }

    /// Starts a command of `args` arguments, its name counted.
    pub(crate) fn command(&mut self, args: usize) -> &mut Self {
        debug_assert_eq!(self.left, 0, "the last command is missing arguments");
        self.commands += 1;
        self.left = args;
        self.bytes.push(b'*');
        self.number(args as u64);
        self
    }

    /// One argument, as bytes.
    pub(crate) fn arg(&mut self, a: impl AsRef<[u8]>) -> &mut Self {
        let a = a.as_ref();
        self.header(a.len());
        self.bytes.extend_from_slice(a);
        self.end()
    }

    /// One argument, a number in decimal (as redis-rs writes one).
    pub(crate) fn uint(&mut self, n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let d = decimal(n, &mut digits);
        self.arg(d)
    }

    /// One argument, a signed number in decimal.
    pub(crate) fn int(&mut self, n: i64) -> &mut Self {
        if n >= 0 {
            return self.uint(n.unsigned_abs());
        }
        let mut digits = [0u8; 20];
        let d = decimal(n.unsigned_abs(), &mut digits);
        self.header(d.len() + 1);
        self.bytes.push(b'-');
        self.bytes.extend_from_slice(d);
        self.end()
    }

    /// One argument, a float in its shortest decimal form (a `BLMOVE` timeout).
    pub(crate) fn float(&mut self, x: f64) -> &mut Self {
        let mut text = [0u8; 32];
        let mut w = &mut text[..];
        // 32 bytes hold any f64's shortest form.
        let _ = write!(w, "{x}");
        let len = 32 - w.len();
        self.arg(&text[..len])
    }

    /// One argument: `before`, then `prefix`, then `id` padded with zeros to ten
    /// digits, as `format!("{before}{prefix}{id:010}")` (a request key, a reply
    /// channel) without building the string.
    pub(crate) fn id_key(&mut self, before: &str, prefix: &str, id: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let d = decimal(id, &mut digits);
        let zeros = 10usize.saturating_sub(d.len());
        self.header(before.len() + prefix.len() + zeros + d.len());
        self.bytes.extend_from_slice(before.as_bytes());
        self.bytes.extend_from_slice(prefix.as_bytes());
        self.bytes.extend(std::iter::repeat_n(b'0', zeros));
        self.bytes.extend_from_slice(d);
        self.end()
    }

    /// Where it stands now, to come back to with [`Packed::back_to`]: the head
    /// of a pipeline that never changes is packed once.
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            len: self.bytes.len(),
            commands: self.commands,
            left: self.left,
        }
    }

    /// Drops what was packed after `mark`.
    pub(crate) fn back_to(&mut self, mark: Mark) {
        self.bytes.truncate(mark.len);
        self.commands = mark.commands;
        self.left = mark.left;
    }

    /// How many commands it holds: how many answers to read.
    pub(crate) fn len(&self) -> usize {
        self.commands
    }

    /// What to write.
    pub(crate) fn bytes(&self) -> &[u8] {
        debug_assert_eq!(self.left, 0, "the last command is missing arguments");
        &self.bytes
    }

    fn header(&mut self, len: usize) {
        debug_assert!(self.left > 0, "more arguments than the command said");
        self.left = self.left.saturating_sub(1);
        self.bytes.push(b'$');
        self.number(len as u64);
    }

    fn end(&mut self) -> &mut Self {
        self.bytes.extend_from_slice(b"\r\n");
        self
    }

    /// `n` and the line's end.
    fn number(&mut self, n: u64) {
        let mut digits = [0u8; 20];
        let d = decimal(n, &mut digits);
        self.bytes.extend_from_slice(d);
        self.bytes.extend_from_slice(b"\r\n");
    }
}

/// A place in a [`Packed`] (its [`Packed::mark`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    len: usize,
    commands: usize,
    left: usize,
}

/// The decimal digits of `n`, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_packed_as_redis_rs_packs_them() {
        let mut p = Packed::default();
        p.command(6)
            .arg("BLMOVE")
            .arg("Q")
            .arg(b"Q")
            .arg("LEFT")
            .arg("LEFT")
            .arg("0.5");
        p.command(5)
            .arg("EVALSHA")
            .arg("abc")
            .int(0)
            .int(i64::MIN)
            .uint(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.cmd("BLMOVE")
            .arg("Q")
            .arg("Q")
            .arg("LEFT")
            .arg("LEFT")
            .arg("0.5")
            .cmd("EVALSHA")
            .arg("abc")
            .arg(0)
            .arg(i64::MIN)
            .arg(u64::MAX);
        assert_eq!(p.bytes(), &pipe.get_packed_pipeline()[..]);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn an_id_key_is_the_prefix_and_the_id_padded_to_ten_digits() {
        let mut p = Packed::default();
        for id in [0, 7, 1_234_567_890, 12_345_678_901, u64::MAX] {
            p.clear();
            p.command(1).id_key("MSGPACK:", "P-RESPONSE-1-", id);
            let expected =
                redis::cmd(&format!("MSGPACK:P-RESPONSE-1-{id:010}")).get_packed_command();
            assert_eq!(p.bytes(), &expected[..], "id {id}");
        }
        p.clear();
        p.command(1).id_key("", "P-REQ-", 42);
        assert_eq!(p.bytes(), b"*1\r\n$16\r\nP-REQ-0000000042\r\n");
    }

    #[test]
    fn a_cleared_pack_starts_over() {
        let mut p = Packed::default();
        p.command(1).arg("PING");
        p.clear();
        assert_eq!(p.len(), 0);
        p.command(2).arg("ECHO").arg("");
        assert_eq!(p.bytes(), b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n");
        assert_eq!(p.len(), 1);
    }

    /// The attack: one reply of 40 MiB left the publisher's buffer at 80 MiB
    /// (its JSON and msgpack forms) for the life of the process.
    #[test]
    fn a_buffer_grown_for_one_large_pipeline_is_not_kept() {
        let mut p = Packed::default();
        p.command(2).arg("ECHO").arg(vec![b'x'; KEEP_BYTES + 1]);
        p.clear();
        assert!(p.bytes.capacity() <= KEEP_BYTES);
        p.command(2).arg("ECHO").arg(vec![b'x'; 1000]);
        let kept = p.bytes.capacity();
        p.clear();
        assert_eq!(p.bytes.capacity(), kept, "a usual buffer is kept");
        p.command(1).arg("PING");
        assert_eq!(p.bytes(), b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn going_back_to_a_mark_keeps_the_head_and_its_count() {
        let mut p = Packed::default();
        p.command(1).arg("PING");
        p.command(3).arg("GET");
        let head = p.mark();
        p.arg("a").arg("b");
        p.back_to(head);
        p.arg("c").int(-9);
        assert_eq!(
            p.bytes(),
            b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nGET\r\n$1\r\nc\r\n$2\r\n-9\r\n"
        );
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn floats_are_written_in_their_shortest_decimal_form() {
        let mut p = Packed::default();
        p.command(3).float(0.5).float(2.0).float(0.125);
        assert_eq!(p.bytes(), b"*3\r\n$3\r\n0.5\r\n$1\r\n2\r\n$5\r\n0.125\r\n");
    }

    #[test]
    #[should_panic(expected = "missing arguments")]
    #[cfg(debug_assertions)]
    fn a_command_short_of_its_arguments_is_caught_in_debug_builds() {
        let mut p = Packed::default();
        p.command(2).arg("GET");
        p.command(1).arg("PING");
    }
}
