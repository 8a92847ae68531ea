# frozen_string_literal: true

# The errors a CerbasClient::Client raises: one hierarchy, so that a caller
# rescues CerbasClient::Error and nothing of the Redis library or the socket
# layer leaks. Not for reply errors: a function's own error comes back as the
# reply Hash <tt>{"status" => "error", "data" => message}</tt>, not raised.
#
#   CerbasClient::Error            (a module: every error below includes it)
#   ├─ TimeoutError    < ::Timeout::Error   no reply within the call's timeout
#   ├─ ConnectionError < StandardError      Redis unreachable, the connection lost
#   │                                       with the call in flight, Redis restarted
#   │  └─ ClosedError                       the client was closed
#   └─ ProtocolError   < StandardError      Redis or the server answered something
#                                           outside the protocol (an error reply to
#                                           a command, a reply that is not JSON/msgpack)
#
# Error is a module rather than a base class so that TimeoutError can also be a
# ::Timeout::Error (code that rescues the standard timeout keeps working).

require "timeout"

module CerbasClient
  # Included by every error this client raises: <tt>rescue CerbasClient::Error</tt>.
  module Error; end

  # No reply within the call's timeout. A ::Timeout::Error too. The request may
  # still run later: it cannot be taken back once queued.
  class TimeoutError < ::Timeout::Error
    include Error
  end

  # Redis could not be reached, or the connection broke while the call was in
  # flight, or Redis restarted (its run_id changed): the call's outcome is
  # unknown (it may have been queued and may still run).
  class ConnectionError < StandardError
    include Error
  end

  # The client was closed (before or during the call).
  class ClosedError < ConnectionError; end

  # Redis refused a command (e.g. OOM, WRONGTYPE on the counter) or a reply could
  # not be decoded.
  class ProtocolError < StandardError
    include Error
  end
end
