"""Media URLs the server fetches: only public addresses (decided on the resolved address,
redirects included) or networks and domains the settings allow; no file paths unless
under ALLOWED_LOCAL_MEDIA_PATH; a download without Content-Length is cut at the byte cap."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import assert_error, image_message, png_bytes, post, video_message


class MediaHandler(BaseHTTPRequestHandler):
    redirect_to = ""

    def do_GET(self):
        if self.path == "/img.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
        elif self.path == "/endless":  # no Content-Length: only the streamed count can stop it
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(400):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


def serve(host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), MediaHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def media_hosts():
    """An allowed media host on 127.0.0.2 (exempted by PRIVATE_MEDIA_NETWORKS), a forbidden one on 127.0.0.1."""
    allowed, forbidden = serve("127.0.0.2"), serve("127.0.0.1")
    MediaHandler.redirect_to = f"http://127.0.0.1:{forbidden.server_address[1]}/img.png"
    yield f"http://127.0.0.2:{allowed.server_address[1]}", f"http://127.0.0.1:{forbidden.server_address[1]}"
    allowed.shutdown()
    forbidden.shutdown()


def test_image_from_an_allowed_host_is_fetched(strict, media_hosts):
    allowed, _ = media_hosts
    response = post(strict.base_url, {"messages": image_message(allowed + "/img.png"), "max_tokens": 2})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/img.png", "http://[::1]:{port}/img.png", "http://169.254.169.254/latest/meta-data/",
    "http://localhost:{port}/img.png", "http://0x7f.1:{port}/img.png", "http://2130706433:{port}/img.png",
    "http://[::ffff:127.0.0.1]:{port}/img.png", "http://10.1.2.3/x.png", "http://224.0.0.1/x.png",
])
def test_private_loopback_link_local_and_multicast_urls_are_refused(strict, media_hosts, url):
    port = media_hosts[1].rsplit(":", 1)[1]
    response = post(strict.base_url, {"messages": image_message(url.format(port=port))})
    assert_error(response, 400, "media_url_forbidden")


def test_redirect_from_allowed_host_to_loopback_is_refused(strict, media_hosts):
    allowed, _ = media_hosts
    response = post(strict.base_url, {"messages": image_message(allowed + "/redirect")})
    assert_error(response, 400, "media_url_forbidden")


def test_streamed_download_over_cap_is_413(strict, media_hosts):
    allowed, _ = media_hosts
    response = post(strict.base_url, {"messages": video_message(allowed + "/endless")})
    assert_error(response, 413, "media_too_large")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "gopher://127.0.0.1/x"])
def test_file_urls_and_paths_are_refused_by_default(strict, url):
    assert_error(post(strict.base_url, {"messages": image_message(url)}), 400, "invalid_media_url")


def test_allowed_domains_list_refuses_other_hosts(make_server):
    srv = make_server(allowed_media_domains="images.example.com")
    response = post(srv.base_url, {"messages": image_message("http://evil.example.org/x.png")})
    assert_error(response, 400, "media_url_forbidden")


def test_local_media_path_serves_files_under_it_only(make_server, tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    srv = make_server(allowed_local_media_path=str(tmp_path))
    ok = post(srv.base_url, {"messages": image_message(str(tmp_path / "ok.png")), "max_tokens": 2})
    assert ok.status_code == 200
    ok = post(srv.base_url, {"messages": image_message(f"file://{tmp_path}/ok.png"), "max_tokens": 2})
    assert ok.status_code == 200
    escape = post(srv.base_url, {"messages": image_message(f"{tmp_path}/../../etc/passwd")})
    assert_error(escape, 400, "invalid_media_url")
